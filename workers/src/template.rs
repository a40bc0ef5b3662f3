//! Placeholders in webhook URLs, headers and bodies, resolved from the task input.
//!
//! The syntax is Keptn's webhook-service syntax, so Keptn webhook configurations carry over:
//! `{{.data.service}}` is replaced by the `service` field of the task input, and
//! `{{ .data.deployment.uri.0 }}` walks nested objects (and arrays, by index). Spaces inside the
//! braces are ignored. `{{.data}}` alone is the whole input as JSON. A string is inserted as it
//! is; any other value as compact JSON. Nothing else is recognised inside `{{ }}`: an unknown
//! form is an error rather than text left in a request, since a half-rendered request is worse
//! than none. A path that is missing (or null) is an error naming the path.

use serde_json::Value;

/// Why a template could not be rendered; every variant is a problem of the task's input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{` without its `}}`.
    #[error("unclosed placeholder starting at byte {at}")]
    Unclosed {
        /// Byte offset of the `{{`.
        at: usize,
    },
    /// Something in braces that is not `.data` or `.data.<path>`.
    #[error("placeholder {{{{{placeholder}}}}} is not of the form {{{{.data.<path>}}}}")]
    Malformed {
        /// The text between the braces.
        placeholder: String,
    },
    /// The path names nothing in the input.
    #[error("placeholder {{{{.{path}}}}}: the task input has no value at {path}")]
    Missing {
        /// The path as written, `data.a.b`.
        path: String,
    },
}

/// Renders `template` with placeholders resolved from `data`.
pub fn render(template: &str, data: &Value) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(TemplateError::Unclosed { at: offset + start });
        };
        let placeholder = after[..end].trim();
        let value = resolve(placeholder, data)?;
        match value {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        let consumed = start + 2 + end + 2;
        rest = &rest[consumed..];
        offset += consumed;
    }
    out.push_str(rest);
    Ok(out)
}

/// Renders every string inside `value` (keys stay as written); other leaves are kept.
pub fn render_value(value: &Value, data: &Value) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(s) => Value::String(render(s, data)?),
        Value::Array(items) => Value::Array(items.iter().map(|v| render_value(v, data)).collect::<Result<_, _>>()?),
        Value::Object(map) => Value::Object(
            map.iter().map(|(k, v)| Ok((k.clone(), render_value(v, data)?))).collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

/// The value at a dotted path (`a.b.0.c`) in `data`; an empty path is `data` itself.
pub fn lookup<'a>(data: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = data;
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        at = match at {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!at.is_null()).then_some(at)
}

fn resolve<'a>(placeholder: &str, data: &'a Value) -> Result<&'a Value, TemplateError> {
    let malformed = || TemplateError::Malformed { placeholder: placeholder.to_string() };
    let path = placeholder.strip_prefix(".data").ok_or_else(malformed)?;
    // `.database` must not be read as `.data` + `base`: after the root comes a dot or nothing.
    let path = match path.strip_prefix('.') {
        Some(p) if !p.is_empty() && p.split('.').all(|s| !s.is_empty() && !s.contains(char::is_whitespace)) => p,
        None if path.is_empty() => "",
        _ => return Err(malformed()),
    };
    lookup(data, path)
        .ok_or_else(|| TemplateError::Missing { path: format!("data.{path}").trim_end_matches('.').into() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input() -> Value {
        json!({
            "project": "sockshop",
            "service": "carts",
            "deployment": {"uri": ["http://carts.dev", "http://carts-primary.dev"], "replicas": 3},
            "labels": {"team": "checkout"},
            "empty": null
        })
    }

    #[test]
    fn replaces_top_level_and_nested_paths_with_or_without_spaces() {
        let text = "{{.data.project}}/{{ .data.service }} at {{.data.deployment.uri.1}} x{{.data.deployment.replicas}}";
        assert_eq!(render(text, &input()).unwrap(), "sockshop/carts at http://carts-primary.dev x3");
    }

    #[test]
    fn non_strings_are_inserted_as_json() {
        assert_eq!(render("{{.data.labels}}", &input()).unwrap(), r#"{"team":"checkout"}"#);
        assert_eq!(render("{{.data}}", &json!({"a": 1})).unwrap(), r#"{"a":1}"#);
        assert_eq!(render("no placeholders { } }}", &input()).unwrap(), "no placeholders { } }}");
    }

    #[test]
    fn a_missing_or_null_key_is_an_error_naming_the_path() {
        let missing = render("x {{.data.deployment.image}}", &input()).unwrap_err();
        assert_eq!(missing, TemplateError::Missing { path: "data.deployment.image".into() });
        assert_eq!(
            missing.to_string(),
            "placeholder {{.data.deployment.image}}: the task input has no value at data.deployment.image"
        );
        assert!(matches!(render("{{.data.empty}}", &input()), Err(TemplateError::Missing { .. })));
        assert!(matches!(render("{{.data.deployment.uri.7}}", &input()), Err(TemplateError::Missing { .. })));
    }

    #[test]
    fn malformed_and_unclosed_placeholders_are_errors() {
        for bad in ["{{service}}", "{{.database}}", "{{.data.}}", "{{.data..a}}", "{{ .env.token }}"] {
            assert!(matches!(render(bad, &input()), Err(TemplateError::Malformed { .. })), "{bad}");
        }
        assert_eq!(render("ab {{.data.service", &input()), Err(TemplateError::Unclosed { at: 3 }));
    }

    #[test]
    fn render_value_renders_string_leaves_only() {
        let body = json!({"text": "deploy {{.data.service}}", "n": 1, "tags": ["{{.data.project}}"]});
        assert_eq!(
            render_value(&body, &input()).unwrap(),
            json!({"text": "deploy carts", "n": 1, "tags": ["sockshop"]})
        );
    }
}
