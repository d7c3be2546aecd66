//! Who is calling, and what they may see. Every FHIR request except the open ones
//! (`/fhir/metadata`, `/fhir/.well-known/smart-configuration`) carries a bearer token; the
//! verified caller's SMART scopes decide which interactions it may use on which types, and a
//! patient (or member-user) token sees only its patient's compartment: anything else is answered
//! as if it did not exist.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use schemas::IssueType;
use serde_json::Value;

use crate::audit::AuditEntry;
use crate::error::ApiError;
use crate::SharedState;

pub use schemas::smart::{Context, Interaction};

/// A token's granted scopes, as the resource server needs them.
pub trait Grants: Send + Sync {
    /// The contexts in which the scopes allow `interaction` on `resource_type`.
    fn contexts_allowing(&self, resource_type: &str, interaction: Interaction) -> Vec<Context>;
    /// Whether any scope is in this context (e.g. a backend client's `system/…`).
    fn has_context(&self, context: Context) -> bool;
}

/// A verified caller.
#[derive(Clone)]
pub struct Principal {
    pub client_id: String,
    pub subject: Option<String>,
    /// Patient in context (patient launch).
    pub patient: Option<String>,
    /// `Patient/123` for a member login.
    pub fhir_user: Option<String>,
    /// The granted scopes as text (for audit).
    pub scope: String,
    pub grants: Arc<dyn Grants>,
    /// The organizations the client is registered to act for (a payer's NPI, say).
    pub organizations: Vec<schemas::Identifier>,
}

/// Why a token was not accepted (the message goes into `WWW-Authenticate` and the outcome).
#[derive(Debug, Clone)]
pub struct Rejected(pub String);

#[async_trait]
pub trait TokenVerifier: Send + Sync {
    async fn verify(&self, bearer: &str) -> Result<Arc<Principal>, Rejected>;
}

/// The caller of a request, as handlers see it.
#[derive(Clone)]
pub enum Caller {
    /// `--insecure-no-auth`: everything is allowed.
    Open,
    Token(Arc<Principal>),
}

/// What a caller may see of a type after authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    All,
    /// Only resources in this patient's compartment (plus types outside any compartment).
    Compartment(String),
}

impl Visibility {
    /// Whether a stored resource may be shown.
    pub fn allows(&self, resource: &Value) -> bool {
        match self {
            Visibility::All => true,
            Visibility::Compartment(pid) => {
                let rtype = resource.get("resourceType").and_then(Value::as_str).unwrap_or("");
                // Organizations, practitioners, … are not patient data: a member's app needs
                // them to show its claims.
                !schemas::compartment::has_patient_compartment(rtype)
                    || schemas::compartment::in_patient_compartment(resource, pid)
            }
        }
    }

    pub fn allows_json(&self, content: Option<&str>) -> bool {
        match (self, content) {
            (Visibility::All, _) => true,
            (_, None) => false,
            (_, Some(c)) => serde_json::from_str::<Value>(c).map(|v| self.allows(&v)).unwrap_or(false),
        }
    }
}

fn forbidden(msg: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, IssueType::Forbidden, msg)
}

impl Caller {
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Token(p) => Some(&p.client_id),
        }
    }

    /// The organizations the calling client is registered to act for.
    pub fn organizations(&self) -> &[schemas::Identifier] {
        match self {
            Caller::Open => &[],
            Caller::Token(p) => &p.organizations,
        }
    }

    /// May this caller use `interaction` on `rtype`, and on which resources?
    pub fn authorize(&self, rtype: &str, interaction: Interaction) -> Result<Visibility, ApiError> {
        let p = match self {
            Caller::Open => return Ok(Visibility::All),
            Caller::Token(p) => p,
        };
        let contexts = p.grants.contexts_allowing(rtype, interaction);
        let verb = format!("{interaction:?}").to_lowercase();
        match contexts.iter().max() {
            None => Err(forbidden(format!("the token's scopes do not allow {verb} on {rtype} (granted: {})", p.scope))),
            Some(Context::System) => Ok(Visibility::All),
            Some(Context::User) => {
                match p.fhir_user.as_deref().and_then(schemas::compartment::patient_id_of_reference) {
                    Some(pid) => Ok(Visibility::Compartment(pid.to_string())),
                    None => Err(forbidden(
                        "user scopes need a member login (fhirUser Patient/…) to know whose data to show".into(),
                    )),
                }
            }
            Some(Context::Patient) => match &p.patient {
                Some(pid) => Ok(Visibility::Compartment(pid.clone())),
                None => Err(forbidden("patient scopes need a patient in context (launch/patient)".into())),
            },
        }
    }

    /// Writes to the payer feed are for backend systems: `system/` scopes only.
    pub fn authorize_write(&self, rtype: &str, interaction: Interaction) -> Result<(), ApiError> {
        let p = match self {
            Caller::Open => return Ok(()),
            Caller::Token(p) => p,
        };
        if p.grants.contexts_allowing(rtype, interaction).contains(&Context::System) {
            Ok(())
        } else {
            let verb = format!("{interaction:?}").to_lowercase();
            Err(forbidden(format!(
                "{verb} on {rtype} needs a system scope (system/{rtype}.write or system/{rtype}.cud); granted: {}",
                p.scope
            )))
        }
    }
}

impl Caller {
    /// Write status links are for the backend systems that write.
    pub fn authorize_write_status(&self) -> Result<(), ApiError> {
        match self {
            Caller::Open => Ok(()),
            Caller::Token(p) if p.grants.has_context(Context::System) => Ok(()),
            Caller::Token(_) => Err(forbidden("write status is for backend clients with system scopes".into())),
        }
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Self::Rejection> {
        if state.verifier.is_none() {
            return Ok(Caller::Open);
        }
        parts
            .extensions
            .get::<Arc<Principal>>()
            .cloned()
            .map(Caller::Token)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, IssueType::Login, "no verified bearer token"))
    }
}

/// Paths under `/fhir` that need no token. The middleware runs inside the `/fhir` router, where
/// paths arrive without the prefix; both forms are accepted.
fn is_open(path: &str) -> bool {
    matches!(path.strip_prefix("/fhir").unwrap_or(path), "/metadata" | "/.well-known/smart-configuration")
}

fn unauthorized(reason: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, IssueType::Login, reason.to_string()).into_response();
    let challenge =
        format!("Bearer realm=\"payerx\", error=\"invalid_token\", error_description=\"{}\"", reason.replace('"', "'"));
    let value =
        HeaderValue::from_str(&challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"payerx\""));
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    resp
}

/// `fhir.read`, `fhir.update`, … from the method and path, with the type and id touched.
fn describe(method: &axum::http::Method, path: &str) -> (String, Option<String>, Option<String>) {
    let segs: Vec<&str> = path.trim_start_matches("/fhir").split('/').filter(|s| !s.is_empty()).collect();
    let action = match (method.as_str(), segs.as_slice()) {
        ("GET", [t, ..]) if t.starts_with('_') => "fhir.write-status",
        ("GET", [_, _, "_history", _]) => "fhir.vread",
        ("GET", [_, _, "_history"]) => "fhir.history",
        ("GET", [_, _]) => "fhir.read",
        ("GET", [_]) => "fhir.search",
        ("PUT", _) => "fhir.update",
        ("POST", [_, "_search"]) => "fhir.search",
        ("POST", []) => "fhir.bundle",
        ("POST", _) => "fhir.create",
        ("DELETE", _) => "fhir.delete",
        _ => "fhir.other",
    };
    let rtype = segs.first().filter(|t| !t.starts_with('_')).map(|s| s.to_string());
    let id = segs.get(1).map(|s| s.to_string());
    (action.to_string(), rtype, id)
}

/// Authenticates every FHIR request (except the open ones) and audits it with its outcome.
pub async fn authenticate(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    // Inside the nested router the URI has lost its `/fhir` prefix; audit the full path.
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map(|u| u.0.path().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let Some(verifier) = state.verifier.clone() else {
        return next.run(req).await;
    };
    if is_open(&path) {
        return next.run(req).await;
    }
    let (action, rtype, id) = describe(req.method(), &path);
    let request = format!("{} {path}", req.method());
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| t.trim().to_string());
    let principal = match bearer {
        None => Err(Rejected("a bearer token is required".into())),
        Some(t) => verifier.verify(&t).await,
    };
    let principal = match principal {
        Ok(p) => p,
        Err(Rejected(reason)) => {
            state
                .audit
                .record(AuditEntry {
                    action: "access.denied".into(),
                    success: false,
                    http_status: Some(401),
                    resource_type: rtype,
                    resource_id: id,
                    request: Some(request),
                    detail: reason.clone(),
                    ..Default::default()
                })
                .await;
            return unauthorized(&reason);
        }
    };
    req.extensions_mut().insert(principal.clone());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    state
        .audit
        .record(AuditEntry {
            action,
            success: status < 400,
            http_status: Some(status),
            client_id: Some(principal.client_id.clone()),
            subject: principal.subject.clone(),
            patient: principal.patient.clone(),
            resource_type: rtype,
            resource_id: id,
            request: Some(request),
            scope: Some(principal.scope.clone()),
            detail: String::new(),
            correlation_id: None,
        })
        .await;
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    /// Grants from a list of (context, type or "*", interactions).
    struct Fixed(Vec<(Context, &'static str, Vec<Interaction>)>);

    impl Grants for Fixed {
        fn contexts_allowing(&self, rtype: &str, i: Interaction) -> Vec<Context> {
            self.0
                .iter()
                .filter(|(_, t, is)| (*t == "*" || *t == rtype) && is.contains(&i))
                .map(|(c, _, _)| *c)
                .collect()
        }
        fn has_context(&self, c: Context) -> bool {
            self.0.iter().any(|(x, _, _)| *x == c)
        }
    }

    fn caller(grants: Fixed, patient: Option<&str>, fhir_user: Option<&str>) -> Caller {
        Caller::Token(Arc::new(Principal {
            client_id: "app".into(),
            subject: None,
            patient: patient.map(str::to_string),
            fhir_user: fhir_user.map(str::to_string),
            scope: "test".into(),
            grants: Arc::new(grants),
            organizations: Vec::new(),
        }))
    }

    #[test]
    fn patient_scopes_see_only_their_compartment() {
        let c = caller(Fixed(vec![(Context::Patient, "*", vec![Interaction::Read])]), Some("p1"), None);
        let vis = c.authorize("ExplanationOfBenefit", Interaction::Read).unwrap();
        assert_eq!(vis, Visibility::Compartment("p1".into()));
        assert!(vis.allows(&json!({"resourceType": "ExplanationOfBenefit", "patient": {"reference": "Patient/p1"}})));
        assert!(!vis.allows(&json!({"resourceType": "ExplanationOfBenefit", "patient": {"reference": "Patient/p2"}})));
        assert!(vis.allows(&json!({"resourceType": "Patient", "id": "p1"})));
        assert!(!vis.allows(&json!({"resourceType": "Patient", "id": "p2"})));
        // Not patient data: visible, a member's app needs the payer Organization of its claims.
        assert!(vis.allows(&json!({"resourceType": "Organization", "id": "payer"})));
        assert!(!vis.allows_json(None), "a deletion marker is not shown to a compartment reader");
        assert_eq!(c.authorize("Patient", Interaction::Delete).unwrap_err().status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn patient_scopes_without_a_patient_are_refused() {
        let c = caller(Fixed(vec![(Context::Patient, "*", vec![Interaction::Read])]), None, None);
        assert_eq!(c.authorize("Coverage", Interaction::Read).unwrap_err().status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn user_scopes_follow_the_members_fhir_user() {
        let c = caller(Fixed(vec![(Context::User, "Coverage", vec![Interaction::Read])]), None, Some("Patient/m1"));
        assert_eq!(c.authorize("Coverage", Interaction::Read).unwrap(), Visibility::Compartment("m1".into()));
        let c = caller(Fixed(vec![(Context::User, "Coverage", vec![Interaction::Read])]), None, Some("Practitioner/x"));
        assert!(c.authorize("Coverage", Interaction::Read).is_err());
    }

    #[test]
    fn system_scopes_see_everything_and_only_they_write() {
        let both = Fixed(vec![
            (Context::Patient, "*", vec![Interaction::Read, Interaction::Update]),
            (Context::System, "Patient", vec![Interaction::Read, Interaction::Update]),
        ]);
        let c = caller(both, Some("p1"), None);
        assert_eq!(c.authorize("Patient", Interaction::Read).unwrap(), Visibility::All, "the broadest context wins");
        assert!(c.authorize_write("Patient", Interaction::Update).is_ok());
        assert!(
            c.authorize_write("Coverage", Interaction::Update).is_err(),
            "patient/*.write does not feed the payer data"
        );
        assert!(c.authorize_write_status().is_ok());
        let patient_only = caller(Fixed(vec![(Context::Patient, "*", vec![Interaction::Update])]), Some("p1"), None);
        assert!(patient_only.authorize_write_status().is_err());
        assert!(Caller::Open.authorize_write("Anything", Interaction::Delete).is_ok());
    }

    #[test]
    fn metadata_and_discovery_are_open_with_or_without_the_prefix() {
        for p in
            ["/fhir/metadata", "/metadata", "/fhir/.well-known/smart-configuration", "/.well-known/smart-configuration"]
        {
            assert!(is_open(p), "{p}");
        }
        assert!(!is_open("/fhir/Patient/1") && !is_open("/Patient/metadata"));
    }

    #[test]
    fn actions_are_named_from_the_route() {
        let get = axum::http::Method::GET;
        assert_eq!(describe(&get, "/fhir/Patient/1").0, "fhir.read");
        assert_eq!(describe(&get, "/fhir/Patient/1/_history/2").0, "fhir.vread");
        assert_eq!(describe(&get, "/fhir/Patient/1/_history").0, "fhir.history");
        assert_eq!(describe(&axum::http::Method::POST, "/fhir").0, "fhir.bundle");
        assert_eq!(describe(&get, "/fhir/Claim").0, "fhir.search");
        assert_eq!(describe(&axum::http::Method::POST, "/fhir/Claim/_search").0, "fhir.search");
        let (a, t, id) = describe(&axum::http::Method::PUT, "/fhir/Coverage/c1");
        assert_eq!((a.as_str(), t.as_deref(), id.as_deref()), ("fhir.update", Some("Coverage"), Some("c1")));
    }
}
