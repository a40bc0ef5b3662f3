//! Shipyard definitions: Capstan's format and Keptn's `spec.keptn.sh/0.2.x`, parsed and validated
//! into one [`model::Definition`].

pub mod model;
