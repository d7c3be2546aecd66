//! payerx as a library: configuration, the assembly of every role into one process, and the
//! commands of the `payerx` binary. The tests crate starts the same assembly in-process.

pub mod admin;
pub mod app;
pub mod background;
pub mod bench;
pub mod bench_attachments;
pub mod bench_auth;
pub mod bench_member_match;
pub mod config;
pub mod events;
pub mod fetcher;
pub mod load;
pub mod replay;
pub mod security;
pub mod synth;

pub use app::App;
pub use config::{BackendArgs, Role, ServeArgs};
