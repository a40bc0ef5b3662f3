//! Selectors of `triggeredOn`: `{match: {result: pass, <task>.result: [fail, warning]}}`.
//!
//! Every malformed part is reported (an unknown key, a value that is not a result, a subject
//! that is neither `result` nor `<task>.result`); whether a named task exists is checked later by
//! `validate`, once all sequences are known.

use serde_yaml::Value;

use super::build::shown;
use super::diagnostic::{Diagnostics, Place};
use super::model::{Condition, ConditionSubject, Selector, TaskResult};
use super::raw::scalar_text;

/// `selector: {match: {result: pass, <task>.result: [fail, warning]}}`; `None` if malformed.
pub(super) fn selector(place: &Place, event: &str, raw: Option<&Value>, out: &mut Diagnostics) -> Option<Selector> {
    let bad = |out: &mut Diagnostics, what: String| {
        out.push(place.clone(), format!("selector of `{event}`: {what}"));
    };
    let map = match raw {
        None | Some(Value::Null) => return Some(Selector::default()),
        Some(Value::Mapping(map)) => map,
        Some(_) => {
            bad(out, "must be a mapping like `{match: {result: pass}}`".into());
            return None;
        }
    };
    let mut conditions = Vec::new();
    let mut ok = true;
    for (key, value) in map {
        match (scalar_text(key).as_deref(), value) {
            (Some("match"), Value::Mapping(entries)) => {
                for (subject, results) in entries {
                    match condition(subject, results) {
                        Ok(condition) => conditions.push(condition),
                        Err(what) => {
                            bad(out, what);
                            ok = false;
                        }
                    }
                }
            }
            (Some("match"), _) => {
                bad(out, "`match` must be a mapping like `{result: pass}`".into());
                ok = false;
            }
            (name, _) => {
                let name = name.map_or_else(|| format!("{key:?}"), str::to_string);
                bad(out, format!("unknown key `{name}` (only `match` is allowed)"));
                ok = false;
            }
        }
    }
    ok.then_some(Selector { conditions })
}

fn condition(subject: &Value, results: &Value) -> Result<Condition, String> {
    let key = scalar_text(subject).unwrap_or_else(|| format!("{subject:?}"));
    let subject = match key.as_str() {
        "result" => ConditionSubject::Run,
        other => match other.strip_suffix(".result") {
            Some(task) if !task.is_empty() => ConditionSubject::Task(task.to_string()),
            _ => return Err(format!("`{key}` is neither `result` nor `<task>.result`")),
        },
    };
    let texts: Vec<Option<String>> = match results {
        Value::Sequence(items) => items.iter().map(scalar_text).collect(),
        one => vec![scalar_text(one)],
    };
    if texts.is_empty() {
        return Err(format!("`{key}` lists no result, so it can never match"));
    }
    let mut any_of = Vec::new();
    for text in texts {
        match text.as_deref().and_then(TaskResult::parse) {
            Some(result) if !any_of.contains(&result) => any_of.push(result),
            Some(_) => {}
            None => {
                let shown = shown(text.as_deref());
                return Err(format!("`{key}`: {shown} is not one of pass, warning, fail, failed"));
            }
        }
    }
    Ok(Condition { subject, any_of })
}
