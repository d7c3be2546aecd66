//! Stream processors: pure functions from an input event to output events. Each module is one
//! processor; [`runtime::processor::run`] moves their events.

pub mod cases;
pub mod member_match;
pub mod validate;
pub mod validate_processor;

pub use cases::CasesProcessor;
pub use validate_processor::{check_change, ValidateProcessor};
