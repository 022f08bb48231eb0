//! Shaping stored history into a prompt: repairing interrupted tool rounds and
//! trimming to the context window without splitting a call from its result.

use std::collections::HashSet;

use openpista_proto::{ChatMessage, Role};

/// Text given to the model for a call whose result was never stored (the
/// process died mid-turn).
pub const MISSING_RESULT: &str =
    "error: no result was recorded for this call (the turn was interrupted)";

/// Makes a history window well formed for any provider:
/// - tool results whose assistant message fell outside the window are dropped;
/// - tool results that answer no call of the preceding assistant are dropped;
/// - calls without a stored result get a synthetic error result.
pub fn repair_history(messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    let mut open: Vec<(String, String)> = Vec::new(); // (call id, name) awaiting results
    let mut answered: HashSet<String> = HashSet::new();
    let mut in_round = false;
    for msg in messages {
        match msg.role {
            Role::Tool => {
                let id = msg.tool_call_id.clone().unwrap_or_default();
                if in_round && open.iter().any(|(c, _)| *c == id) && answered.insert(id) {
                    out.push(msg);
                }
            }
            _ => {
                close_round(&mut out, &mut open, &answered);
                answered.clear();
                in_round = msg.role == Role::Assistant && !msg.tool_calls.is_empty();
                if in_round {
                    open = msg
                        .tool_calls
                        .iter()
                        .map(|c| (c.id.clone(), c.name.clone()))
                        .collect();
                }
                out.push(msg);
            }
        }
    }
    close_round(&mut out, &mut open, &answered);
    out
}

fn close_round(
    out: &mut Vec<ChatMessage>,
    open: &mut Vec<(String, String)>,
    answered: &HashSet<String>,
) {
    for (id, name) in open.drain(..) {
        if !answered.contains(&id) {
            out.push(ChatMessage::tool_result(id, name, MISSING_RESULT));
        }
    }
}

/// Drops the oldest messages until the rest costs at most `budget`.
///
/// Messages are dropped in units: a message together with the tool results
/// that follow it, so a call is never separated from its result. The newest
/// unit is always kept; if it alone exceeds the budget, `Err(cost)` is returned.
pub fn fit_to_window(
    messages: Vec<ChatMessage>,
    budget: usize,
    cost: impl Fn(&ChatMessage) -> usize,
) -> Result<Vec<ChatMessage>, usize> {
    // Unit boundaries: indices where a non-tool message starts a unit.
    let mut units: Vec<(usize, usize)> = Vec::new(); // (start, cost)
    for (i, m) in messages.iter().enumerate() {
        let c = cost(m);
        match (m.role, units.last_mut()) {
            (Role::Tool, Some(last)) => last.1 += c,
            _ => units.push((i, c)),
        }
    }
    let mut total: usize = units.iter().map(|u| u.1).sum();
    let mut first = 0;
    while total > budget && first + 1 < units.len() {
        total -= units[first].1;
        first += 1;
    }
    if total > budget {
        return Err(total);
    }
    let start = units.get(first).map(|u| u.0).unwrap_or(0);
    let mut kept: Vec<ChatMessage> = messages.into_iter().skip(start).collect();
    // A window should not open with an assistant reply to a dropped question
    // when something else follows; that is harmless, so it is kept.
    kept.shrink_to_fit();
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openpista_proto::ToolCall;

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: "t".into(),
            arguments: "{}".into(),
        }
    }

    #[test]
    fn interrupted_round_gets_synthetic_results() {
        let h = vec![
            ChatMessage::user("q"),
            ChatMessage::assistant("", vec![call("a"), call("b")]),
            ChatMessage::tool_result("a", "t", "ok"),
            ChatMessage::user("next"),
        ];
        let r = repair_history(h);
        assert_eq!(r.len(), 5);
        assert_eq!(r[3].tool_call_id.as_deref(), Some("b"));
        assert_eq!(r[3].content, MISSING_RESULT);
        assert_eq!(r[4].content, "next");
    }

    #[test]
    fn orphan_tool_results_are_dropped() {
        let h = vec![
            ChatMessage::tool_result("x", "t", "orphan"),
            ChatMessage::user("q"),
            ChatMessage::tool_result("y", "t", "stray"),
        ];
        let r = repair_history(h);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].content, "q");
    }

    #[test]
    fn trimming_keeps_calls_with_results() {
        let h = vec![
            ChatMessage::user("old question"),
            ChatMessage::assistant("", vec![call("a")]),
            ChatMessage::tool_result("a", "t", "result"),
            ChatMessage::assistant("answer", vec![]),
            ChatMessage::user("new"),
        ];
        // Each message costs 1. Budget 3 cannot keep the 2-message unit and
        // the two after it (4), so the call and its result go together.
        let kept = fit_to_window(h.clone(), 3, |_| 1).unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].content, "answer");
        let kept = fit_to_window(h.clone(), 4, |_| 1).unwrap();
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[0].tool_calls.len(), 1);
        assert_eq!(kept[1].role, Role::Tool);
        // Never a tool result at the start.
        for budget in 1..6 {
            if let Ok(k) = fit_to_window(h.clone(), budget, |_| 1) {
                assert_ne!(k[0].role, Role::Tool, "budget {budget}");
            }
        }
        assert_eq!(fit_to_window(h, 0, |_| 1), Err(1));
    }
}
