//! Shipyard definitions: Capstan's format and Keptn's `spec.keptn.sh/0.2.x`, parsed and validated
//! into one [`model::Definition`].
//!
//! [`parse`] reads the header first (`apiVersion` picks the [`Flavor`](model::Flavor), `kind` must
//! be `Shipyard`), then the typed file, then applies the flavor's defaults and checks the whole
//! definition, returning every problem with its place ([`Diagnostics`]).
//!
//! Unknown keys: a Keptn file is read as Keptn reads it, so keys Capstan does not know are
//! ignored and every Keptn Shipyard loads unchanged. In a Capstan file an unknown key below
//! `spec` (stage, sequence, trigger, task, retry, timeouts, requires) is reported as
//! "unknown field `x`", because there it is almost always a typo that would silently drop a
//! setting. `metadata` and the top level are left open for labels and tooling keys.
//!
//! Capstan's own keys (`type`, `retry`, `timeouts`, `requires`, `dispatch`, `award`,
//! `continueOnFailure`, `idempotent`, `claim`) are honoured in Keptn files too, on top of Keptn's
//! defaults; only `dependsOn` is refused there, since Keptn sequences are chains.

mod build;
mod diagnostic;
mod header;
pub mod model;
mod raw;
mod selector;
mod summary;
mod triggers;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod validation_tests;

pub use build::ESCALATION;
pub use diagnostic::{Diagnostic, Diagnostics, Place};
pub use header::{CAPSTAN_API_VERSION, file_kind};

use model::Definition;

/// Parses and validates a Shipyard file (Capstan's format or Keptn's `spec.keptn.sh/0.2.x`).
pub fn parse(text: &str) -> Result<Definition, Diagnostics> {
    // Read as untyped YAML first: syntax errors come with their position, and the header decides
    // how the rest is read.
    let doc: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| Diagnostics::from(Diagnostic::from_yaml(&e)))?;
    let flavor = header::flavor(&doc)?;
    // Parse the text again (not `doc`) so that type errors keep their line and column.
    let raw: raw::RawShipyard = serde_yaml::from_str(text).map_err(|e| Diagnostics::from(Diagnostic::from_yaml(&e)))?;
    let mut problems = Diagnostics::default();
    let definition = build::build(flavor, raw, &mut problems);
    validate::check(&definition, &mut problems);
    if problems.is_empty() { Ok(definition) } else { Err(problems) }
}
