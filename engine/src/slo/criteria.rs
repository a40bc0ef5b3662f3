//! One SLO criterion (`<600`, `>=0.95`, `<=+10%`, `>-5`): parsing and checking against a value.
//!
//! Keptn's rules, which this module follows:
//! - whitespace anywhere in the string is ignored;
//! - operators are `<`, `<=`, `=`, `>=`, `>` (`==` is tolerated as `=`);
//! - a trailing `%` makes the criterion relative to the baseline, in percent of it
//!   (`<=+10%` means "at most 10 % above the baseline"; no sign counts as `+`);
//! - a leading `+` or `-` without `%` makes it relative by absolute difference (`<=+50`);
//! - a bare number is a fixed threshold.

use std::fmt;

/// A comparison operator of a criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `=` (or `==`)
    Equal,
    /// `>=`
    GreaterOrEqual,
    /// `>`
    Greater,
}

impl Operator {
    /// Whether `value <op> target` holds. NaN never satisfies anything.
    pub fn holds(self, value: f64, target: f64) -> bool {
        match self {
            Operator::Less => value < target,
            Operator::LessOrEqual => value <= target,
            Operator::Equal => value == target,
            Operator::GreaterOrEqual => value >= target,
            Operator::Greater => value > target,
        }
    }
}

/// What the number of a criterion is measured against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// A fixed threshold: `<600`.
    Fixed(f64),
    /// A signed change in percent of the baseline: `<=+10%` is `Percent(10.0)`.
    Percent(f64),
    /// A signed absolute change from the baseline: `>-5` is `Delta(-5.0)`.
    Delta(f64),
}

/// A parsed criterion; `raw` keeps the string as written for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Criterion {
    /// The criterion exactly as written in slo.yaml.
    pub raw: String,
    /// The comparison operator.
    pub operator: Operator,
    /// The threshold, fixed or relative to the baseline.
    pub target: Target,
}

/// Why a criterion string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CriterionError {
    /// The string does not start with `<`, `<=`, `=`, `==`, `>=` or `>`.
    #[error("criterion `{0}` must start with one of <, <=, =, >=, >")]
    NoOperator(String),
    /// The part after the operator (and sign) is not a plain decimal number.
    #[error("criterion `{0}` has no valid number after its operator")]
    BadNumber(String),
}

impl Criterion {
    /// Parses one criterion string by Keptn's rules (see the module docs).
    pub fn parse(raw: &str) -> Result<Criterion, CriterionError> {
        let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
        // Longest operators first so `<=` is not read as `<` followed by `=5`.
        let operators = [
            ("<=", Operator::LessOrEqual),
            (">=", Operator::GreaterOrEqual),
            ("==", Operator::Equal),
            ("<", Operator::Less),
            (">", Operator::Greater),
            ("=", Operator::Equal),
        ];
        let (operator, rest) = operators
            .iter()
            .find_map(|(text, op)| compact.strip_prefix(text).map(|rest| (*op, rest)))
            .ok_or_else(|| CriterionError::NoOperator(raw.to_string()))?;
        let (percent, rest) = match rest.strip_suffix('%') {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let (sign, digits) = if let Some(d) = rest.strip_prefix('+') {
            (Some(1.0), d)
        } else if let Some(d) = rest.strip_prefix('-') {
            (Some(-1.0), d)
        } else {
            (None, rest)
        };
        let magnitude = plain_decimal(digits).ok_or_else(|| CriterionError::BadNumber(raw.to_string()))?;
        let target = match (percent, sign) {
            (true, sign) => Target::Percent(sign.unwrap_or(1.0) * magnitude),
            (false, Some(sign)) => Target::Delta(sign * magnitude),
            (false, None) => Target::Fixed(magnitude),
        };
        Ok(Criterion { raw: raw.to_string(), operator, target })
    }

    /// Whether this criterion needs a baseline from earlier results.
    pub fn is_relative(&self) -> bool {
        !matches!(self.target, Target::Fixed(_))
    }

    /// The value the measurement is compared with, or `None` for a relative criterion
    /// without a baseline (Keptn lets such a criterion pass).
    pub fn threshold(&self, baseline: Option<f64>) -> Option<f64> {
        match (self.target, baseline) {
            (Target::Fixed(value), _) => Some(value),
            (Target::Percent(pct), Some(base)) => Some(base * (100.0 + pct) / 100.0),
            (Target::Delta(delta), Some(base)) => Some(base + delta),
            (_, None) => None,
        }
    }

    /// Checks `value` against this criterion; relative criteria pass without a baseline.
    pub fn check(&self, value: f64, baseline: Option<f64>) -> bool {
        match self.threshold(baseline) {
            Some(threshold) => self.operator.holds(value, threshold),
            None => true,
        }
    }
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Parses digits with at most one dot (`600`, `0.95`, `.5`), rejecting what `f64::from_str`
/// would also accept but Keptn would not (`inf`, `NaN`, `1e3`).
fn plain_decimal(text: &str) -> Option<f64> {
    let digits = text.chars().filter(char::is_ascii_digit).count();
    let dots = text.chars().filter(|c| *c == '.').count();
    if digits == 0 || dots > 1 || digits + dots != text.len() {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let cases = [
            ("<600", Operator::Less, Target::Fixed(600.0)),
            (">=0.95", Operator::GreaterOrEqual, Target::Fixed(0.95)),
            ("<=+10%", Operator::LessOrEqual, Target::Percent(10.0)),
            (">-5%", Operator::Greater, Target::Percent(-5.0)),
            ("<=10%", Operator::LessOrEqual, Target::Percent(10.0)),
            ("<+50", Operator::Less, Target::Delta(50.0)),
            (">=-2.5", Operator::GreaterOrEqual, Target::Delta(-2.5)),
            ("=0", Operator::Equal, Target::Fixed(0.0)),
            ("==1", Operator::Equal, Target::Fixed(1.0)),
            (" < = 600 ", Operator::LessOrEqual, Target::Fixed(600.0)),
            ("<.5", Operator::Less, Target::Fixed(0.5)),
        ];
        for (raw, operator, target) in cases {
            let c = Criterion::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!((c.operator, c.target), (operator, target), "{raw}");
            assert_eq!(c.raw, raw);
        }
    }

    #[test]
    fn rejects_bad_strings() {
        for raw in ["", "600", "<", "<abc", "<1e3", "<inf", "<NaN", "<1.2.3", "<+-5", "=<5", "<5%%", "!=5"] {
            assert!(Criterion::parse(raw).is_err(), "{raw} should be rejected");
        }
    }

    #[test]
    fn thresholds_follow_the_baseline() {
        let pct = Criterion::parse("<=+10%").unwrap();
        assert_eq!(pct.threshold(Some(500.0)), Some(550.0));
        assert!(pct.check(550.0, Some(500.0)));
        assert!(!pct.check(550.1, Some(500.0)));
        let down = Criterion::parse(">-5%").unwrap();
        assert_eq!(down.threshold(Some(200.0)), Some(190.0));
        let delta = Criterion::parse("<=+50").unwrap();
        assert_eq!(delta.threshold(Some(500.0)), Some(550.0));
        let minus = Criterion::parse(">=-2").unwrap();
        assert_eq!(minus.threshold(Some(10.0)), Some(8.0));
        // Without earlier results a relative criterion passes, a fixed one does not care.
        assert!(pct.check(1e9, None));
        assert!(!Criterion::parse("<600").unwrap().check(600.0, None));
    }

    #[test]
    fn operators_compare_as_written() {
        let table = [
            (Operator::Less, [true, false, false]),
            (Operator::LessOrEqual, [true, true, false]),
            (Operator::Equal, [false, true, false]),
            (Operator::GreaterOrEqual, [false, true, true]),
            (Operator::Greater, [false, false, true]),
        ];
        for (op, expected) in table {
            let got = [4.0, 5.0, 6.0].map(|v| op.holds(v, 5.0));
            assert_eq!(got, expected, "{op:?}");
        }
        assert!(!Operator::LessOrEqual.holds(f64::NAN, 5.0));
    }
}
