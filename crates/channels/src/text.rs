//! Rendering model text for a channel: HTML escaping and splitting at a
//! length limit on line or word boundaries.

/// Escapes `&`, `<` and `>` for Telegram's HTML parse mode.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_escaped(&mut out, c);
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '&' => out.push_str("&amp;"),
        '<' => out.push_str("&lt;"),
        '>' => out.push_str("&gt;"),
        _ => out.push(c),
    }
}

fn escaped_len(c: char) -> usize {
    match c {
        '&' => 5,
        '<' | '>' => 4,
        _ => 1,
    }
}

/// Splits `text` into escaped HTML parts of at most `limit` characters each
/// (after escaping), in order, preferring a line break, then a space, as the
/// cut point. Empty text gives no parts.
pub fn split_escaped(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(8);
    let chars: Vec<char> = text.chars().collect();
    let mut parts = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        let mut len = 0;
        let mut end = start;
        while end < chars.len() && len + escaped_len(chars[end]) <= limit {
            len += escaped_len(chars[end]);
            end += 1;
        }
        if end < chars.len() {
            let window = &chars[start..end];
            let cut = window
                .iter()
                .rposition(|&c| c == '\n')
                .or_else(|| window.iter().rposition(|&c| c == ' '))
                .filter(|&p| p > 0);
            if let Some(p) = cut {
                end = start + p + 1;
            }
        }
        let part: String = chars[start..end].iter().collect();
        let trimmed = part.trim_end_matches(['\n', ' ']);
        if !trimmed.is_empty() {
            parts.push(escape_html(trimmed));
        }
        start = end;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html_specials() {
        assert_eq!(escape_html("a<b>&c_*"), "a&lt;b&gt;&amp;c_*");
    }

    #[test]
    fn splits_on_lines_then_words_in_order() {
        let text = "aaaa bbbb\ncccc dddd eeee";
        let parts = split_escaped(text, 12);
        assert_eq!(parts, vec!["aaaa bbbb", "cccc dddd", "eeee"]);
    }

    #[test]
    fn never_cuts_an_escape_and_respects_the_limit() {
        let text = "<".repeat(10);
        let parts = split_escaped(&text, 9);
        assert!(parts.iter().all(|p| p.chars().count() <= 9), "{parts:?}");
        assert_eq!(parts.concat(), "&lt;".repeat(10));
    }
}
