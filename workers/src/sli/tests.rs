//! Tests of the shared SLI pieces: the Keptn fixture, time frames, placeholders and times.

use serde_json::json;

use super::*;
use crate::test_server::task;

const FIXTURE: &str = include_str!("../../../engine/tests/fixtures/keptn/sli-config-prometheus.yaml");
const MAY_1: f64 = 1_714_564_800.0; // 2024-05-01T12:00:00Z

fn at(secs: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(secs)
}

#[test]
fn parses_the_keptn_fixture_and_rejects_empty_files() {
    let file = SliFile::parse(FIXTURE).unwrap();
    assert_eq!(file.spec_version, "1.0");
    assert_eq!(
        file.indicators.keys().collect::<Vec<_>>(),
        ["response_time_p50", "response_time_p90", "response_time_p95"]
    );
    assert!(SliFile::parse("spec_version: '1.0'\n").unwrap_err().contains("no indicators"));
    assert!(SliFile::parse("indicators: [1, 2]").unwrap_err().starts_with("sli.yaml is not valid"));
}

#[test]
fn time_frames_follow_start_end_and_timeframe() {
    let frame = |input| TimeFrame::of(&task("get-sli", input), at(MAY_1));
    assert_eq!(frame(json!({})), Ok(TimeFrame { start: MAY_1 - 300.0, end: MAY_1 }));
    assert_eq!(frame(json!({"timeframe": "10m"})), Ok(TimeFrame { start: MAY_1 - 600.0, end: MAY_1 }));
    assert_eq!(
        frame(json!({"start": "2024-05-01T11:00:00Z", "end": "2024-05-01T11:30:00.500Z"})),
        Ok(TimeFrame { start: MAY_1 - 3600.0, end: MAY_1 - 1799.5 })
    );
    assert_eq!(
        frame(json!({"start": "2024-05-01T13:00:00+02:00", "timeframe": "1m"})),
        Ok(TimeFrame { start: MAY_1 - 3600.0, end: MAY_1 - 3540.0 })
    );
    assert_eq!(frame(json!({"end": MAY_1})), Ok(TimeFrame { start: MAY_1 - 300.0, end: MAY_1 }));
    assert_eq!(frame(json!({"start": MAY_1 - 60.0})), Ok(TimeFrame { start: MAY_1 - 60.0, end: MAY_1 }));
    assert!(frame(json!({"start": "yesterday"})).unwrap_err().starts_with("start: "));
    assert!(frame(json!({"start": MAY_1, "end": MAY_1})).unwrap_err().contains("empty"));
}

#[test]
fn placeholders_are_substituted_and_a_missing_one_is_named() {
    let t = task("get-sli", json!({"service": "carts", "stage": "dev", "deployment": "canary"}));
    let frame = TimeFrame { start: MAY_1 - 300.0, end: MAY_1 };
    let vars = placeholders(&t, &Scope::of(&t), &frame);
    let query = r#"rate(x{job="$SERVICE-$PROJECT-$STAGE",d="$DEPLOYMENT",re=~"a$"}[$DURATION_SECONDS])"#;
    assert_eq!(substitute(query, &vars).unwrap(), r#"rate(x{job="carts-sockshop-dev",d="canary",re=~"a$"}[300s])"#);
    let bare = task("get-sli", json!({"service": "carts"}));
    let vars = placeholders(&bare, &Scope::of(&bare), &frame);
    assert_eq!(substitute("$STAGE", &vars), Err("$STAGE is used but the task input gives no stage".into()));
    assert_eq!(substitute("up $UNKNOWN_THING", &vars).unwrap(), "up $UNKNOWN_THING");
}

#[test]
fn rfc3339_round_trips_and_rejects_junk() {
    assert_eq!(parse_rfc3339("2024-05-01T12:00:00Z"), Some(MAY_1));
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
    assert_eq!(parse_rfc3339("2000-02-29T23:59:59-01:00"), Some(951_872_399.0));
    assert_eq!(rfc3339(MAY_1 + 0.25), "2024-05-01T12:00:00.250Z");
    assert_eq!(rfc3339(951_872_399.0), "2000-03-01T00:59:59.000Z");
    for junk in
        ["2024-05-01", "2024-13-01T00:00:00Z", "2024-05-01T12:00:00", "2024-05-01T12:00:00+2", "x024-05-01T12:00:00Z"]
    {
        assert_eq!(parse_rfc3339(junk), None, "{junk}");
    }
}

#[test]
fn numbers_come_as_numbers_or_strings_and_must_be_finite() {
    assert_eq!(number(&json!(1.5)), Ok(1.5));
    assert_eq!(number(&json!(" 42 ")), Ok(42.0));
    assert!(number(&json!("NaN")).is_err());
    assert!(number(&json!("+Inf")).is_err());
    assert!(number(&json!(true)).is_err());
}
