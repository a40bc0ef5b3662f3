//! Durations (`300ms`, `10s`, `5m`, `1h`) and timestamps, both as whole milliseconds.

use serde::{Deserialize, Serialize};

/// A span of time in milliseconds.
pub type Millis = u64;

/// A point in time: milliseconds since the Unix epoch. The runtime passes it in; the engine never
/// reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This instant plus `ms` milliseconds (saturating).
    pub fn plus(self, ms: Millis) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, 0 if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Millis {
        self.0.saturating_sub(earlier.0)
    }
}

/// Parses `300ms`, `10s`, `5m`, `1h` (also `1d` and compound forms like `1m30s`) into milliseconds.
pub fn parse_duration(text: &str) -> Result<Millis, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!("`{text}` is not a duration (expected e.g. 300ms, 10s, 5m, 1h)"));
        }
        let number: u64 = rest[..digits].parse().map_err(|_| format!("`{text}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let factor = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("`{text}`: missing unit (ms, s, m, h)")),
            other => return Err(format!("`{text}`: unknown unit `{other}` (ms, s, m, h)")),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("`{text}`: duration too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("300ms"), Ok(300));
        assert_eq!(parse_duration("10s"), Ok(10_000));
        assert_eq!(parse_duration("5m"), Ok(300_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000));
        assert_eq!(parse_duration("1m30s"), Ok(90_000));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "ten", "10", "10x", "s10", "-1s", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
