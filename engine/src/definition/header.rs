//! The file header: `apiVersion` decides the flavor, `kind` must be `Shipyard`.

use serde_yaml::Value;

use super::diagnostic::{Diagnostic, Diagnostics, Place};
use super::model::Flavor;
use super::raw::scalar_text;

/// The apiVersion of Capstan's own format.
pub const CAPSTAN_API_VERSION: &str = "capstan.dev/v1";

/// The prefix of the Keptn apiVersions Capstan accepts (`spec.keptn.sh/0.2.0` .. `0.2.x`).
const KEPTN_PREFIX: &str = "spec.keptn.sh/0.2.";

/// The `kind` of a YAML document (`Shipyard`, `Remediation`, ...), if it is a mapping that has one.
/// Lets a CLI say what a file is before (or instead of) validating it as a Shipyard.
pub fn file_kind(text: &str) -> Option<String> {
    let doc: Value = serde_yaml::from_str(text).ok()?;
    scalar_text(doc.as_mapping()?.get("kind")?)
}

/// The flavor named by the header of `doc`, or the problems of the header.
pub(super) fn flavor(doc: &Value) -> Result<Flavor, Diagnostics> {
    let problem = |message: String| Diagnostics::from(Diagnostic::new(Place::Document, message));
    let map = match doc {
        Value::Null => return Err(problem("the file is empty; expected a Shipyard".into())),
        Value::Mapping(map) => map,
        _ => {
            return Err(problem(
                "the file is not a YAML mapping; expected a Shipyard with apiVersion, kind and spec".into(),
            ));
        }
    };
    match map.get("kind").map(scalar_text) {
        Some(Some(kind)) if kind == "Shipyard" => {}
        Some(Some(kind)) => {
            return Err(problem(format!(
                "kind `{kind}` is not Shipyard; only Shipyard files define stages and sequences"
            )));
        }
        Some(None) => return Err(problem("`kind` must be the string `Shipyard`".into())),
        // Keptn's SLO and SLI files have no kind but a `spec_version`: name them, since
        // `capstan validate` is easily pointed at the wrong file of a Keptn project.
        None if map.contains_key("spec_version") => {
            return Err(problem(
                "no `kind`: this looks like a Keptn SLO or SLI file (it has `spec_version`), not a Shipyard".into(),
            ));
        }
        None => {
            return Err(problem("no `kind`; a Shipyard file says `kind: Shipyard`".into()));
        }
    }
    let version = match map.get("apiVersion").map(scalar_text) {
        None => {
            return Err(problem(format!("no `apiVersion`; expected `{CAPSTAN_API_VERSION}` or `spec.keptn.sh/0.2.x`")));
        }
        Some(None) => return Err(problem("`apiVersion` must be a string".into())),
        Some(Some(version)) => version,
    };
    if version == CAPSTAN_API_VERSION {
        return Ok(Flavor::Capstan);
    }
    let keptn_patch = version.strip_prefix(KEPTN_PREFIX);
    if keptn_patch.is_some_and(|patch| !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit())) {
        return Ok(Flavor::Keptn { version });
    }
    Err(problem(format!(
        "apiVersion `{version}` is not supported; expected `{CAPSTAN_API_VERSION}` or `spec.keptn.sh/0.2.x`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flavor_of(text: &str) -> String {
        let doc: Value = serde_yaml::from_str(text).expect("test YAML parses");
        match flavor(&doc) {
            Ok(flavor) => format!("{flavor:?}"),
            Err(problems) => problems.to_string(),
        }
    }

    #[test]
    fn accepts_capstan_and_keptn_0_2_x() {
        assert_eq!(flavor_of("apiVersion: capstan.dev/v1\nkind: Shipyard"), "Capstan");
        assert_eq!(
            flavor_of("apiVersion: spec.keptn.sh/0.2.3\nkind: Shipyard"),
            r#"Keptn { version: "spec.keptn.sh/0.2.3" }"#
        );
    }

    #[test]
    fn rejects_other_versions_and_kinds() {
        expect_test::expect![[r#"
            document: apiVersion `spec.keptn.sh/0.1.4` is not supported; expected `capstan.dev/v1` or `spec.keptn.sh/0.2.x`
            document: apiVersion `spec.keptn.sh/0.2.` is not supported; expected `capstan.dev/v1` or `spec.keptn.sh/0.2.x`
            document: no `apiVersion`; expected `capstan.dev/v1` or `spec.keptn.sh/0.2.x`
            document: kind `Remediation` is not Shipyard; only Shipyard files define stages and sequences
            document: `kind` must be the string `Shipyard`
            document: no `kind`; a Shipyard file says `kind: Shipyard`
            document: the file is not a YAML mapping; expected a Shipyard with apiVersion, kind and spec
            document: the file is empty; expected a Shipyard"#]]
        .assert_eq(
            &[
                "apiVersion: spec.keptn.sh/0.1.4\nkind: Shipyard",
                "apiVersion: spec.keptn.sh/0.2.\nkind: Shipyard",
                "kind: Shipyard",
                "apiVersion: capstan.dev/v1\nkind: Remediation",
                "apiVersion: capstan.dev/v1\nkind: [Shipyard]",
                "apiVersion: capstan.dev/v1",
                "- a list",
                "",
            ]
            .map(flavor_of)
            .join("\n"),
        );
    }

    #[test]
    fn file_kind_names_the_kind() {
        assert_eq!(file_kind("kind: Remediation\nspec: {}").as_deref(), Some("Remediation"));
        assert_eq!(file_kind("spec_version: '1.0'"), None);
        assert_eq!(file_kind(": : :"), None);
    }
}
