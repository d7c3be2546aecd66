//! `payerx clients`, `payerx members`, `payerx keys`: manage who may call the API. Each prints
//! one JSON object (or array) on stdout, for scripts.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use auth::{ClientKind, NewClient};
use clap::{Args, Subcommand};

use crate::config::BackendArgs;

#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Register a client. The secret of a confidential-symmetric client is printed once.
    Add(AddClient),
    /// List registered clients (never their secrets).
    List(Backend),
    /// Refuse every token request and token of this client from now on.
    Disable(ClientRef),
    /// Allow a disabled client again.
    Enable(ClientRef),
    /// Set the organizations a client acts for (replacing them; none clears them).
    Organizations(SetOrganizations),
}

#[derive(Debug, Args)]
pub struct SetOrganizations {
    #[command(flatten)]
    pub backend: BackendArgs,
    pub client_id: String,
    /// `SYSTEM|VALUE` (repeatable), as for `clients add`.
    #[arg(long = "organization")]
    pub organizations: Vec<auth::OrganizationId>,
}

#[derive(Debug, Args)]
pub struct Backend {
    #[command(flatten)]
    pub backend: BackendArgs,
}

#[derive(Debug, Args)]
pub struct ClientRef {
    #[command(flatten)]
    pub backend: BackendArgs,
    pub client_id: String,
}

#[derive(Debug, Args)]
pub struct AddClient {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[arg(long)]
    pub name: String,
    /// public | confidential-symmetric | confidential-asymmetric
    #[arg(long)]
    pub kind: String,
    /// Exact redirect URI (repeatable); required for apps that use the authorization code flow.
    #[arg(long = "redirect-uri")]
    pub redirect_uris: Vec<String>,
    /// confidential-asymmetric: where the client publishes its JWKS…
    #[arg(long, conflicts_with = "jwks_file")]
    pub jwks_url: Option<String>,
    /// …or a file holding it.
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,
    /// Scopes the client may ever be granted, space-separated (e.g. "system/*.rs").
    #[arg(long)]
    pub scope: String,
    /// An organization the client acts for, `SYSTEM|VALUE` (repeatable): a payer's NPI, say
    /// `http://hl7.org/fhir/sid/us-npi|1234567893`. A `$member-match` Consent must name one of
    /// them as its recipient.
    #[arg(long = "organization")]
    pub organizations: Vec<auth::OrganizationId>,
}

#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// Link a member login to a Patient (the password is read from standard input).
    Add(AddMember),
}

#[derive(Debug, Args)]
pub struct AddMember {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[arg(long)]
    pub username: String,
    /// Read the password from standard input (the only way: never on the command line).
    #[arg(long, required = true)]
    pub password_stdin: bool,
    /// `Patient/ID` or `ID`.
    #[arg(long)]
    pub patient: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a new signing key; older keys stay published so unexpired tokens keep working.
    Rotate(Backend),
}

fn print(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

pub async fn clients(cmd: ClientsCommand) -> anyhow::Result<()> {
    match cmd {
        ClientsCommand::Add(a) => {
            let db = a.backend.open_db().await?;
            let kind: ClientKind = serde_json::from_value(serde_json::Value::String(a.kind.clone())).map_err(|_| {
                anyhow::anyhow!("--kind {:?}: use public, confidential-symmetric or confidential-asymmetric", a.kind)
            })?;
            let jwks = match &a.jwks_file {
                Some(f) => Some(serde_json::from_str(
                    &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
                )?),
                None => None,
            };
            let created = auth::admin::add_client(
                &db,
                NewClient {
                    name: a.name,
                    kind,
                    redirect_uris: a.redirect_uris,
                    jwks_url: a.jwks_url,
                    jwks,
                    scope: a.scope,
                    organizations: a.organizations,
                },
            )
            .await?;
            print(&created)
        }
        ClientsCommand::List(b) => print(&auth::admin::list_clients(&b.backend.open_db().await?).await?),
        ClientsCommand::Disable(c) => {
            auth::admin::disable_client(&c.backend.open_db().await?, &c.client_id).await?;
            print(&serde_json::json!({"client_id": c.client_id, "enabled": false}))
        }
        ClientsCommand::Organizations(o) => {
            let db = o.backend.open_db().await?;
            auth::admin::set_client_organizations(&db, &o.client_id, &o.organizations).await?;
            print(&serde_json::json!({"client_id": o.client_id, "organizations": o.organizations}))
        }
        ClientsCommand::Enable(c) => {
            auth::admin::enable_client(&c.backend.open_db().await?, &c.client_id).await?;
            print(&serde_json::json!({"client_id": c.client_id, "enabled": true}))
        }
    }
}

pub async fn members(cmd: MembersCommand) -> anyhow::Result<()> {
    match cmd {
        MembersCommand::Add(m) => {
            let mut password = String::new();
            std::io::stdin().read_to_string(&mut password).context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!password.is_empty(), "empty password on standard input");
            let db = m.backend.open_db().await?;
            print(&auth::admin::add_member(&db, &m.username, password, &m.patient).await?)
        }
    }
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Rotate(b) => print(&auth::admin::rotate_keys(&b.backend.open_db().await?).await?),
    }
}
