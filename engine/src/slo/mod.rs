//! Keptn `slo.yaml` quality gates: parsing and scoring.
