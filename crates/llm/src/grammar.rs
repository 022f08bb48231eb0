//! GBNF grammars for tool calls, generated from the tools' JSON schemas.
//!
//! A local model constrained by [`tool_call_grammar`] can only emit one or more
//! lines of the form `{"name": "<registered tool>", "arguments": {...}}` whose
//! arguments follow that tool's schema (types, enums, required properties,
//! no unknown properties). Plain answers are left free by the local provider:
//! the grammar is applied lazily, only once the reply starts with `{`.
//!
//! Supported schema keywords: `type` (object, string, integer, number,
//! boolean, array, null, and lists of types), `properties`, `required`,
//! `enum` and `const` of scalars, `items`, `minimum >= 0`. Anything else
//! falls back to "any JSON value", which the tool layer's validator then
//! checks. The grammar therefore never rejects a valid call, and the
//! validator catches what the grammar cannot express.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use openpista_proto::ToolDefinition;
use serde_json::Value;

/// Deepest nesting of schema objects/arrays expanded into rules.
const MAX_DEPTH: usize = 6;

/// Which replies a grammar allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarShape {
    /// One or more calls, one JSON object per line (`tool_choice = required`).
    Calls,
    /// Either `{"tool_call": <call>}` or `{"response": "<free text>"}`
    /// (`tool_choice = auto`): the model must decide, at a token, between
    /// calling a tool and answering; the answer's text itself is unconstrained.
    Envelope,
}

/// The GBNF grammar (root rule `root`) for one or more tool calls, one per line.
///
/// Returns `None` when `tools` is empty.
pub fn tool_call_grammar(tools: &[ToolDefinition]) -> Option<String> {
    grammar_for(tools, GrammarShape::Calls)
}

/// The GBNF grammar of the given shape. Returns `None` when `tools` is empty.
pub fn grammar_for(tools: &[ToolDefinition], shape: GrammarShape) -> Option<String> {
    if tools.is_empty() {
        return None;
    }
    let mut g = Builder::default();
    let mut alternatives = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let args_rule = g.value_rule(&format!("args{i}"), &tool.parameters, 0);
        let rule = format!("call{i}");
        let name_lit = gbnf_literal(&json_string(&tool.name));
        g.define(
            &rule,
            format!(
                "\"{{\" ws \"\\\"name\\\"\" ws \":\" ws {name_lit} ws \",\" ws \"\\\"arguments\\\"\" ws \":\" ws {args_rule} ws \"}}\""
            ),
        );
        alternatives.push(rule);
    }
    g.define("call", alternatives.join(" | "));
    let root = match shape {
        GrammarShape::Calls => "call (\"\\n\" call){0,7}",
        GrammarShape::Envelope => {
            "\"{\\\"tool_call\\\": \" call \"}\" | \"{\\\"response\\\": \" string \"}\""
        }
    };
    g.define("root", root.to_owned());
    Some(g.finish())
}

#[derive(Default)]
struct Builder {
    rules: BTreeMap<String, String>,
}

impl Builder {
    fn define(&mut self, name: &str, body: String) {
        self.rules.insert(name.to_owned(), body);
    }

    fn finish(mut self) -> String {
        self.define("ws", "[ ]?".to_owned());
        self.define(
            "string",
            "\"\\\"\" ( [^\"\\\\\\x00-\\x1F\\x7F] | \"\\\\\" ( [\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4} ) )* \"\\\"\""
                .to_owned(),
        );
        self.define("integer", "\"-\"? [0-9]{1,15}".to_owned());
        self.define("uinteger", "[0-9]{1,15}".to_owned());
        self.define(
            "number",
            "\"-\"? [0-9]{1,15} (\".\" [0-9]{1,15})? ([eE] [-+]? [0-9]{1,3})?".to_owned(),
        );
        self.define("boolean", "\"true\" | \"false\"".to_owned());
        self.define("null", "\"null\"".to_owned());
        self.define(
            "value",
            "object-any | array-any | string | number | boolean | null".to_owned(),
        );
        self.define(
            "object-any",
            "\"{\" ws ( string ws \":\" ws value ( ws \",\" ws string ws \":\" ws value ){0,31} )? ws \"}\""
                .to_owned(),
        );
        self.define(
            "array-any",
            "\"[\" ws ( value ( ws \",\" ws value ){0,63} )? ws \"]\"".to_owned(),
        );
        let mut out = String::new();
        // `root` first for readability; order does not matter to GBNF.
        if let Some(root) = self.rules.remove("root") {
            let _ = writeln!(out, "root ::= {root}");
        }
        for (name, body) in &self.rules {
            let _ = writeln!(out, "{name} ::= {body}");
        }
        out
    }

    /// Returns the name of a rule (or an inline expression) matching `schema`.
    fn value_rule(&mut self, name: &str, schema: &Value, depth: usize) -> String {
        if depth > MAX_DEPTH {
            return "value".to_owned();
        }
        let Some(obj) = schema.as_object() else {
            // `true` or an unusable schema: any value.
            return "value".to_owned();
        };
        if let Some(c) = obj.get("const") {
            return scalar_literal(c).unwrap_or_else(|| "value".to_owned());
        }
        if let Some(Value::Array(options)) = obj.get("enum") {
            let lits: Option<Vec<String>> = options.iter().map(scalar_literal).collect();
            return match lits {
                Some(lits) if !lits.is_empty() => {
                    self.define(name, lits.join(" | "));
                    name.to_owned()
                }
                _ => "value".to_owned(),
            };
        }
        match obj.get("type") {
            Some(Value::String(t)) => self.typed_rule(name, t, obj, depth),
            Some(Value::Array(types)) => {
                let alts: Vec<String> = types
                    .iter()
                    .filter_map(Value::as_str)
                    .enumerate()
                    .map(|(i, t)| self.typed_rule(&format!("{name}-t{i}"), t, obj, depth))
                    .collect();
                if alts.is_empty() {
                    return "value".to_owned();
                }
                self.define(name, alts.join(" | "));
                name.to_owned()
            }
            _ if obj.contains_key("properties") => self.typed_rule(name, "object", obj, depth),
            _ => "value".to_owned(),
        }
    }

    fn typed_rule(
        &mut self,
        name: &str,
        ty: &str,
        obj: &serde_json::Map<String, Value>,
        depth: usize,
    ) -> String {
        match ty {
            "string" => "string".to_owned(),
            "integer" => {
                let non_negative = obj
                    .get("minimum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| m >= 0.0);
                if non_negative {
                    "uinteger".to_owned()
                } else {
                    "integer".to_owned()
                }
            }
            "number" => "number".to_owned(),
            "boolean" => "boolean".to_owned(),
            "null" => "null".to_owned(),
            "array" => {
                let item = match obj.get("items") {
                    Some(items) => self.value_rule(&format!("{name}-item"), items, depth + 1),
                    None => "value".to_owned(),
                };
                self.define(
                    name,
                    format!("\"[\" ws ( {item} ( ws \",\" ws {item} ){{0,63}} )? ws \"]\""),
                );
                name.to_owned()
            }
            "object" => {
                let Some(Value::Object(props)) = obj.get("properties") else {
                    return "object-any".to_owned();
                };
                let required: Vec<&str> = obj
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                // Required properties first (in schema order), then optional ones,
                // each optional one may be left out.
                let mut parts: Vec<(bool, String)> = Vec::new();
                for (i, (key, sub)) in props.iter().enumerate() {
                    let sub_rule = self.value_rule(&format!("{name}-p{i}"), sub, depth + 1);
                    let kv = format!("{} ws \":\" ws {sub_rule}", gbnf_literal(&json_string(key)));
                    parts.push((required.contains(&key.as_str()), kv));
                }
                parts.sort_by_key(|(req, _)| !*req);
                let body = object_body(&parts);
                self.define(name, format!("\"{{\" ws {body} ws \"}}\""));
                name.to_owned()
            }
            _ => "value".to_owned(),
        }
    }
}

/// The inside of an object: required pairs joined by commas, then the
/// optional pairs in schema order, any of which may be left out. No comma is
/// ever leading or trailing, and the grammar is unambiguous.
fn object_body(parts: &[(bool, String)]) -> String {
    let required: Vec<&str> = parts
        .iter()
        .filter(|(r, _)| *r)
        .map(|(_, kv)| kv.as_str())
        .collect();
    let optional: Vec<&str> = parts
        .iter()
        .filter(|(r, _)| !*r)
        .map(|(_, kv)| kv.as_str())
        .collect();
    if required.is_empty() {
        if optional.is_empty() {
            return String::new();
        }
        return format!("( {} )?", non_empty_subset(&optional));
    }
    let mut body = required.join(" ws \",\" ws ");
    body.push_str(&comma_prefixed(&optional));
    body
}

/// `( ws "," ws a )? ( ws "," ws b )? ...`
fn comma_prefixed(optional: &[&str]) -> String {
    optional
        .iter()
        .map(|kv| format!(" ( ws \",\" ws {kv} )?"))
        .collect()
}

/// A non-empty, in-order subset of `optional`, comma-separated.
fn non_empty_subset(optional: &[&str]) -> String {
    match optional {
        [] => String::new(),
        [last] => (*last).to_owned(),
        [first, rest @ ..] => format!(
            "( {first}{} | {} )",
            comma_prefixed(rest),
            non_empty_subset(rest)
        ),
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A GBNF string literal that matches exactly `text`.
fn gbnf_literal(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn scalar_literal(v: &Value) -> Option<String> {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null => {
            Some(gbnf_literal(&serde_json::to_string(v).ok()?))
        }
        Value::Array(_) | Value::Object(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tool(name: &str, parameters: Value) -> ToolDefinition {
        ToolDefinition {
            name: name.into(),
            description: String::new(),
            parameters,
        }
    }

    #[test]
    fn no_tools_no_grammar() {
        assert!(tool_call_grammar(&[]).is_none());
    }

    #[test]
    fn names_every_tool_and_orders_required_first() {
        let g = tool_call_grammar(&[
            tool(
                "system.run",
                json!({"type": "object", "properties": {
                    "cwd": {"type": "string"},
                    "command": {"type": "string"},
                    "timeout_secs": {"type": "integer", "minimum": 1}
                }, "required": ["command"], "additionalProperties": false}),
            ),
            tool(
                "file.list",
                json!({"type": "object", "properties": {"path": {"type": "string"}, "recursive": {"type": "boolean"}}}),
            ),
        ])
        .unwrap();
        assert!(g.starts_with("root ::= call"), "{g}");
        assert!(g.contains(r#""\"system.run\"""#), "{g}");
        assert!(g.contains(r#""\"file.list\"""#), "{g}");
        // command (required) comes before the optional cwd/timeout_secs.
        let args0 = g.lines().find(|l| l.starts_with("args0 ::=")).unwrap();
        let cmd = args0.find("command").unwrap();
        let cwd = args0.find("cwd").unwrap();
        assert!(cmd < cwd, "{args0}");
        assert!(args0.contains("uinteger"), "{args0}");
        // No required property: an optional, comma-safe subset.
        let args1 = g.lines().find(|l| l.starts_with("args1 ::=")).unwrap();
        assert!(args1.contains(")?"), "{args1}");
    }

    #[test]
    fn enums_and_nested_types() {
        let g = tool_call_grammar(&[tool(
            "x",
            json!({"type": "object", "properties": {
                "mode": {"enum": ["a", "b\"c"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "opt": {"type": ["string", "null"]}
            }, "required": ["mode", "tags", "opt"]}),
        )])
        .unwrap();
        assert!(g.contains(r#""\"b\\\"c\"""#), "{g}");
        // Properties are ordered by name: mode, opt, tags.
        assert!(g.contains("args0-p1 ::= string | null"), "{g}");
        assert!(g.contains("args0-p2 ::= \"[\""), "{g}");
    }

    #[test]
    fn envelope_offers_a_call_or_a_response() {
        let g = grammar_for(
            &[tool("t", json!({"type": "object", "properties": {}}))],
            GrammarShape::Envelope,
        )
        .unwrap();
        let root = g.lines().next().unwrap();
        assert_eq!(
            root,
            r#"root ::= "{\"tool_call\": " call "}" | "{\"response\": " string "}""#
        );
    }

    #[test]
    fn literal_escaping() {
        assert_eq!(gbnf_literal("a\"b\\c\n"), r#""a\"b\\c\n""#);
    }
}
