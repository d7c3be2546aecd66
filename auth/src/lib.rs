//! SMART on FHIR authorization (being built).
