//! FHIR search: one engine for every `GET /fhir/{type}?…`. The registry says which parameters
//! exist; the resource projection keeps index rows for them (`extract`), per view generation;
//! `query` parses a request into a typed query and `plan` runs it against the index.

pub mod dates;
pub mod extract;
pub(crate) mod index;
pub mod plan;
pub mod query;
pub mod registry;

pub use plan::{Compartment, SearchPage};
pub use query::{ParseOptions, SearchIssue, SearchQuery, DEFAULT_COUNT, MAX_COUNT};
pub use registry::{ParamType, SearchParam};

/// Text index table (tokens, strings, references, URIs) of a generation.
pub(crate) fn text_table(generation: i64) -> String {
    format!("res_idx_g{generation}")
}

/// Date index table of a generation.
pub(crate) fn date_table(generation: i64) -> String {
    format!("res_idx_date_g{generation}")
}
