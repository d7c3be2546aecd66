//! Stream processors: pure functions from an input event to output events. Each module is one
//! processor; [`runtime::processor::run`] moves their events.

pub mod validate;
pub mod validate_processor;

pub use validate_processor::{check_change, ValidateProcessor};
