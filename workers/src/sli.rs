//! What the SLI providers (task type `get-sli`) share: Keptn's `sli.yaml`, the time frame of a
//! measurement, the `$SERVICE`-style placeholders of a query, and the output shape.
//!
//! Output of every provider: `{"sli": {"<name>": <number>, ...}, "sliErrors": {"<name>":
//! "<why no value>", ...}, "start": "<RFC 3339>", "end": "<RFC 3339>"}`. `sli` is what the
//! `evaluation` task after it reads (the engine carries outputs into later inputs, merged flat,
//! so the names are chosen not to collide with other tasks' outputs). An indicator without a
//! value is listed in `sliErrors` and left out of `sli`: a value is never invented, and the
//! evaluation scores a missing value as failed. As with Keptn's providers, the task passes once
//! the source was asked; judging the values is the evaluation's job.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::handler::{Outcome, TaskContext};
use crate::scope::{Scope, duration_property};

/// The time frame when the task gives none, as Keptn's default.
pub const DEFAULT_TIMEFRAME: Duration = Duration::from_secs(300);

/// Keptn's `sli.yaml`: a name per indicator and its query.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SliFile {
    /// `spec_version`, kept for messages.
    #[serde(default)]
    pub spec_version: String,
    /// Indicator name to query.
    #[serde(default)]
    pub indicators: BTreeMap<String, String>,
}

impl SliFile {
    /// Parses an `sli.yaml` text.
    pub fn parse(text: &str) -> Result<SliFile, String> {
        let file: SliFile = serde_yaml::from_str(text).map_err(|e| format!("sli.yaml is not valid: {e}"))?;
        if file.indicators.is_empty() {
            return Err("sli.yaml defines no indicators".into());
        }
        Ok(file)
    }
}

/// The measured interval, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeFrame {
    /// Start of the interval.
    pub start: f64,
    /// End of the interval (the instant queries are evaluated at).
    pub end: f64,
}

impl TimeFrame {
    /// From the task's `start`, `end` (RFC 3339 or Unix seconds) and `timeframe` (`"5m"`)
    /// properties: both ends if given; one end and the length; else the length ending `now`.
    pub fn of(task: &TaskContext, now: SystemTime) -> Result<TimeFrame, String> {
        let instant = |name: &str| task.property(name).map(|v| instant(name, v)).transpose();
        let (start, end) = (instant("start")?, instant("end")?);
        let length = match task.property("timeframe") {
            Some(v) => duration_property("timeframe", v)?,
            None => DEFAULT_TIMEFRAME,
        }
        .as_secs_f64();
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let frame = match (start, end) {
            (Some(start), Some(end)) => TimeFrame { start, end },
            (Some(start), None) if task.property("timeframe").is_some() => TimeFrame { start, end: start + length },
            (Some(start), None) => TimeFrame { start, end: now },
            (None, Some(end)) => TimeFrame { start: end - length, end },
            (None, None) => TimeFrame { start: now - length, end: now },
        };
        if frame.end <= frame.start {
            return Err(format!(
                "the time frame is empty: start {} is not before end {}",
                rfc3339(frame.start),
                rfc3339(frame.end)
            ));
        }
        Ok(frame)
    }

    /// Whole seconds, as `$DURATION_SECONDS` wants them.
    pub fn seconds(&self) -> u64 {
        (self.end - self.start).round().max(1.0) as u64
    }
}

/// The placeholder values of a query: `$PROJECT`, `$STAGE`, `$SERVICE`, `$DEPLOYMENT` and
/// `$DURATION_SECONDS` (as `300s`, so that Keptn's `[$DURATION_SECONDS]` windows work).
pub fn placeholders(task: &TaskContext, scope: &Scope, frame: &TimeFrame) -> BTreeMap<&'static str, String> {
    let mut vars =
        BTreeMap::from([("PROJECT", scope.project.clone()), ("DURATION_SECONDS", format!("{}s", frame.seconds()))]);
    if let Some(stage) = &scope.stage {
        vars.insert("STAGE", stage.clone());
    }
    if let Some(service) = &scope.service {
        vars.insert("SERVICE", service.clone());
    }
    if let Some(deployment) = task.input().get("deployment").and_then(Value::as_str) {
        vars.insert("DEPLOYMENT", deployment.to_string());
    }
    vars
}

/// Replaces `$NAME` placeholders. A known placeholder without a value is an error; any other
/// `$` text is left alone (PromQL regexes may hold a `$`).
pub fn substitute(query: &str, vars: &BTreeMap<&'static str, String>) -> Result<String, String> {
    const KNOWN: [&str; 5] = ["PROJECT", "STAGE", "SERVICE", "DEPLOYMENT", "DURATION_SECONDS"];
    let mut out = String::with_capacity(query.len());
    let mut rest = query;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let len = after.find(|c: char| !(c.is_ascii_uppercase() || c == '_')).unwrap_or(after.len());
        let name = &after[..len];
        match (vars.get(name), KNOWN.contains(&name)) {
            (Some(value), _) => out.push_str(value),
            (None, true) => return Err(format!("${name} is used but the task input gives no {}", name.to_lowercase())),
            (None, false) => {
                out.push('$');
                out.push_str(name);
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The values and the reasons for missing ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SliReport {
    /// Indicator values.
    pub values: BTreeMap<String, f64>,
    /// Indicators without a value, and why.
    pub errors: BTreeMap<String, String>,
}

impl SliReport {
    /// The provider's passing outcome.
    pub fn into_outcome(self, frame: Option<&TimeFrame>) -> Outcome {
        if !self.errors.is_empty() {
            tracing::info!(missing = ?self.errors.keys().collect::<Vec<_>>(), "some indicators have no value");
        }
        let mut output = json!({"sli": self.values, "sliErrors": self.errors});
        if let Some(frame) = frame {
            output["start"] = json!(rfc3339(frame.start));
            output["end"] = json!(rfc3339(frame.end));
        }
        Outcome::pass(output)
    }
}

/// The names the task asks for: `indicators` as a list of names, else every defined one.
pub fn requested(task: &TaskContext, defined: impl Iterator<Item = String>) -> Result<Vec<String>, String> {
    match task.property("indicators") {
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| {
                n.as_str().map(str::to_string).ok_or_else(|| "indicators: every name must be a string".to_string())
            })
            .collect(),
        Some(Value::Object(_)) | None => Ok(defined.collect()),
        Some(_) => Err("indicators: must be a list of names (or, for queries, an object)".into()),
    }
}

/// A number from JSON: a number, or a string holding one (Prometheus sends strings).
pub fn number(v: &Value) -> Result<f64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("{v} is not a number"))?;
    if n.is_finite() { Ok(n) } else { Err(format!("{n} is not a finite number")) }
}

fn instant(name: &str, v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{name}: {n} is not a time")),
        Value::String(s) => parse_rfc3339(s.trim()).ok_or_else(|| format!("{name}: {s:?} is not an RFC 3339 time")),
        _ => Err(format!("{name}: must be an RFC 3339 time or Unix seconds")),
    }
}

/// Parses `2024-05-01T12:00:00Z`, with optional fraction and a `Z` or `±hh:mm` offset, to Unix
/// seconds. Hand-written because it is all the date handling this crate needs.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        s.get(r.clone()).filter(|t| t.bytes().all(|c| c.is_ascii_digit())).and_then(|t| t.parse().ok())
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut fraction = 0.0;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        fraction = format!("0.{}", &f[..digits]).parse().ok()?;
        rest = &f[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = (rest[1..3].parse::<i64>().ok()?, rest[4..6].parse::<i64>().ok()?);
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs as f64 + fraction)
}

/// Unix seconds as `2024-05-01T12:00:00.000Z`.
pub fn rfc3339(unix: f64) -> String {
    let millis = (unix * 1000.0).round() as i64;
    let (secs, ms) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    let (days, tod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", tod / 3600, tod % 3600 / 60, tod % 60)
}

// Howard Hinnant's days-from-civil algorithm (public domain arithmetic on the proleptic
// Gregorian calendar).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

#[cfg(test)]
mod tests;
