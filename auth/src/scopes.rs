//! SMART App Launch scopes, v1 (`patient/*.read`) and v2 (`patient/Observation.rs`), plus the
//! identity and launch-context scopes. Pure: parsing, coverage, narrowing and plain-words
//! descriptions for the consent page.
//!
//! v1 permissions map onto v2 ones: `read` = `rs`, `write` = `cud`, `*` = `cruds`, so a v1 and a
//! v2 scope with the same meaning compare as equal for coverage and narrowing.
//!
//! Granular v2 scopes (`patient/Observation.rs?category=laboratory`) are parsed and kept (they
//! travel in the token) but grant nothing through [`ScopeSet::allows`]: payerx does not filter
//! results by them yet, and serving the whole type would give an app more than the member agreed
//! to. [`ScopeSet::access`] exposes the filters for a resource server that does filter.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use schemas::smart::{Context, Interaction};

/// A set of interactions; v1 and v2 suffixes both parse into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);
    pub const ALL: Permissions = Permissions(31);
    /// v1 `read`.
    pub const READ: Permissions = Permissions(2 | 16);
    /// v1 `write`.
    pub const WRITE: Permissions = Permissions(1 | 4 | 8);

    pub fn contains(self, i: Interaction) -> bool {
        self.0 & i.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn is_subset_of(self, other: Permissions) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn intersect(self, other: Permissions) -> Permissions {
        Permissions(self.0 & other.0)
    }

    /// The v2 suffix, letters in the order SMART requires (`cruds`).
    pub fn v2(self) -> String {
        Interaction::ALL.iter().filter(|i| self.contains(**i)).map(|i| i.letter()).collect()
    }

    /// The v1 suffix, when one means exactly these permissions.
    pub fn v1(self) -> Option<&'static str> {
        match self {
            Permissions::ALL => Some("*"),
            Permissions::READ => Some("read"),
            Permissions::WRITE => Some("write"),
            _ => None,
        }
    }

    /// Parses a v2 suffix: one or more of `c r u d s`, each at most once, in that order.
    fn parse_v2(s: &str) -> Option<Permissions> {
        let mut bits = 0u8;
        let mut last = None;
        for ch in s.chars() {
            let pos = Interaction::ALL.iter().position(|i| i.letter() == ch)?;
            if last.is_some_and(|l| pos <= l) {
                return None;
            }
            last = Some(pos);
            bits |= Interaction::ALL[pos].bit();
        }
        (bits != 0).then_some(Permissions(bits))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeVersion {
    V1,
    V2,
}

/// `context/Type.permissions[?query]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceScope {
    pub context: Context,
    /// `None` is the wildcard `*`.
    pub resource_type: Option<String>,
    pub permissions: Permissions,
    /// The syntax it was written in; kept so a granted scope reads back as requested.
    pub version: ScopeVersion,
    /// The granular query (v2 only), without the `?`.
    pub query: Option<String>,
}

impl ResourceScope {
    fn parse(s: &str) -> Option<ResourceScope> {
        let (ctx, rest) = s.split_once('/')?;
        let context = Context::parse(ctx)?;
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) if !q.is_empty() => (b, Some(q.to_string())),
            Some(_) => return None,
            None => (rest, None),
        };
        let (ty, perm) = body.split_once('.')?;
        let resource_type = match ty {
            "*" => None,
            t if is_resource_type(t) => Some(t.to_string()),
            _ => return None,
        };
        let (permissions, version) = match perm {
            "read" => (Permissions::READ, ScopeVersion::V1),
            "write" => (Permissions::WRITE, ScopeVersion::V1),
            "*" => (Permissions::ALL, ScopeVersion::V1),
            p => (Permissions::parse_v2(p)?, ScopeVersion::V2),
        };
        // v1 had no granular form.
        if version == ScopeVersion::V1 && query.is_some() {
            return None;
        }
        Some(ResourceScope { context, resource_type, permissions, version, query })
    }

    /// Whether this scope names `resource_type` (directly or through `*`).
    pub fn matches_type(&self, resource_type: &str) -> bool {
        self.resource_type.as_deref().is_none_or(|t| t == resource_type)
    }

    /// The granular query's parameters, decoded.
    pub fn query_params(&self) -> Vec<(String, String)> {
        self.query
            .as_deref()
            .map(|q| form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
            .unwrap_or_default()
    }

    /// Everything `self` grants, `other` grants too.
    pub fn is_covered_by(&self, other: &ResourceScope) -> bool {
        self.context == other.context
            && (other.resource_type.is_none() || other.resource_type == self.resource_type)
            && self.permissions.is_subset_of(other.permissions)
            && (other.query.is_none() || other.query == self.query)
    }

    /// What both grant, if anything.
    pub fn intersect(&self, other: &ResourceScope) -> Option<ResourceScope> {
        if self.context != other.context {
            return None;
        }
        let resource_type = match (&self.resource_type, &other.resource_type) {
            (None, t) | (t, None) => t.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => return None,
        };
        let permissions = self.permissions.intersect(other.permissions);
        if permissions.is_empty() {
            return None;
        }
        let query = match (&self.query, &other.query) {
            (None, q) | (q, None) => q.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            // Two different filters: their conjunction is not something a scope can express.
            _ => return None,
        };
        let version = if self.version == ScopeVersion::V1 && query.is_none() && permissions.v1().is_some() {
            ScopeVersion::V1
        } else {
            ScopeVersion::V2
        };
        Some(ResourceScope { context: self.context, resource_type, permissions, version, query })
    }
}

impl fmt::Display for ResourceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ty = self.resource_type.as_deref().unwrap_or("*");
        let perm = match (self.version, self.permissions.v1()) {
            (ScopeVersion::V1, Some(p)) if self.query.is_none() => p.to_string(),
            _ => self.permissions.v2(),
        };
        write!(f, "{}/{}.{}", self.context, ty, perm)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// A FHIR resource type name: an upper-case letter, then letters.
fn is_resource_type(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphabetic()) && s.len() <= 64
}

/// One scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Resource(ResourceScope),
    OpenId,
    FhirUser,
    Profile,
    Launch,
    LaunchPatient,
    OfflineAccess,
    OnlineAccess,
    /// Anything else, kept verbatim (servers ignore scopes they do not know).
    Other(String),
}

impl Scope {
    pub fn parse(s: &str) -> Scope {
        match s {
            "openid" => Scope::OpenId,
            "fhirUser" => Scope::FhirUser,
            "profile" => Scope::Profile,
            "launch" => Scope::Launch,
            "launch/patient" => Scope::LaunchPatient,
            "offline_access" => Scope::OfflineAccess,
            "online_access" => Scope::OnlineAccess,
            _ => ResourceScope::parse(s).map_or_else(|| Scope::Other(s.to_string()), Scope::Resource),
        }
    }

    pub fn as_resource(&self) -> Option<&ResourceScope> {
        match self {
            Scope::Resource(r) => Some(r),
            _ => None,
        }
    }

    /// Whether everything `self` grants, `other` grants too.
    pub fn is_covered_by(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::Resource(a), Scope::Resource(b)) => a.is_covered_by(b),
            (a, b) => a == b,
        }
    }

    /// Identity and launch-context scopes a member cannot untick on the consent page: without
    /// them the launch itself does not work.
    pub fn is_required_for_launch(&self) -> bool {
        matches!(self, Scope::OpenId | Scope::FhirUser | Scope::Launch | Scope::LaunchPatient)
    }

    /// The scope in plain words, for the consent page.
    pub fn describe(&self) -> String {
        match self {
            Scope::OpenId => "Confirm who you are to the app (sign-in)".to_string(),
            Scope::FhirUser => "Tell the app which member record is yours".to_string(),
            Scope::Profile => "Share your basic profile (name)".to_string(),
            Scope::Launch | Scope::LaunchPatient => {
                "Let the app know which member's records it is working with".to_string()
            }
            Scope::OfflineAccess => {
                "Keep access when you are not using the app, until you revoke it or it goes unused for a long time"
                    .to_string()
            }
            Scope::OnlineAccess => "Keep access while you are using the app".to_string(),
            Scope::Other(s) => format!("Access named \"{s}\" (not used by this health plan)"),
            Scope::Resource(r) => describe_resource_scope(r),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Resource(r) => r.fmt(f),
            Scope::OpenId => f.write_str("openid"),
            Scope::FhirUser => f.write_str("fhirUser"),
            Scope::Profile => f.write_str("profile"),
            Scope::Launch => f.write_str("launch"),
            Scope::LaunchPatient => f.write_str("launch/patient"),
            Scope::OfflineAccess => f.write_str("offline_access"),
            Scope::OnlineAccess => f.write_str("online_access"),
            Scope::Other(s) => f.write_str(s),
        }
    }
}

/// A scope string in plain words (unknown scopes are described as such).
pub fn describe(scope: &str) -> String {
    Scope::parse(scope).describe()
}

fn describe_resource_scope(r: &ResourceScope) -> String {
    let object = match (r.context, r.resource_type.as_deref()) {
        (Context::Patient, None) => "all your health plan records".to_string(),
        (Context::Patient, Some(t)) => format!("your {}", resource_words(t)),
        (Context::User, None) => "all records you are allowed to see".to_string(),
        (Context::User, Some(t)) => format!("{} you are allowed to see", resource_words(t)),
        (Context::System, None) => "all records of every member".to_string(),
        (Context::System, Some(t)) => format!("every member's {}", resource_words(t)),
    };
    let p = r.permissions;
    let mut verbs = Vec::new();
    if p.contains(Interaction::Read) || p.contains(Interaction::Search) {
        verbs.push(match (p.contains(Interaction::Read), p.contains(Interaction::Search)) {
            (true, true) => "see and search",
            (true, false) => "see",
            _ => "search",
        });
    }
    if p.contains(Interaction::Create) {
        verbs.push("add to");
    }
    if p.contains(Interaction::Update) {
        verbs.push("change");
    }
    if p.contains(Interaction::Delete) {
        verbs.push("delete");
    }
    let verbs = match verbs.len() {
        0 => String::new(),
        1 => verbs[0].to_string(),
        n => format!("{} and {}", verbs[..n - 1].join(", "), verbs[n - 1]),
    };
    let mut s = format!("{} {object}", capitalize(&verbs));
    if let Some(t) = &r.resource_type {
        s.push_str(&format!(" ({t})"));
    }
    if r.query.is_some() {
        let filter: Vec<String> = r.query_params().into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
        s.push_str(&format!(", limited to {}", filter.join(" and ")));
    }
    s
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Plain words for the resource types a member sees most.
fn resource_words(t: &str) -> String {
    match t {
        "ExplanationOfBenefit" => "claims and explanations of benefits",
        "Coverage" => "insurance coverage",
        "Patient" => "personal details (name, birth date, address)",
        "Observation" => "lab results, vital signs and other observations",
        "Condition" => "conditions and diagnoses",
        "AllergyIntolerance" => "allergies",
        "Immunization" => "immunizations",
        "MedicationRequest" => "prescriptions",
        "MedicationDispense" => "filled prescriptions",
        "MedicationStatement" => "medications",
        "Medication" => "medication details",
        "Procedure" => "procedures",
        "Encounter" => "visits and encounters",
        "DiagnosticReport" => "lab and imaging reports",
        "DocumentReference" => "clinical documents",
        "CarePlan" => "care plans",
        "CareTeam" => "care team",
        "Claim" => "claims and prior authorization requests",
        "ClaimResponse" => "claim and prior authorization decisions",
        "Device" => "implanted devices",
        "Goal" => "health goals",
        "Provenance" => "record history (where the data came from)",
        "Organization" => "provider and payer organizations",
        "Practitioner" => "doctors and other practitioners",
        "PractitionerRole" => "practitioner roles",
        "Location" => "care locations",
        "RelatedPerson" => "related people",
        other => return format!("{other} records"),
    }
    .to_string()
}

/// How a scope set answers for one interaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Granted for the whole type.
    Full,
    /// Granted only through granular scopes: the raw queries (any one may match).
    Filtered(Vec<String>),
    Denied,
}

/// A set of scopes, in request order, without duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScopeSet {
    scopes: Vec<Scope>,
}

impl ScopeSet {
    /// Parses a space-separated scope string (unknown scopes are kept as [`Scope::Other`]).
    pub fn parse(s: &str) -> ScopeSet {
        ScopeSet::from_scopes(s.split_whitespace().map(Scope::parse))
    }

    pub fn from_scopes(scopes: impl IntoIterator<Item = Scope>) -> ScopeSet {
        let mut set = ScopeSet::default();
        for s in scopes {
            set.insert(s);
        }
        set
    }

    /// Adds a scope unless it is already there.
    pub fn insert(&mut self, scope: Scope) {
        if !self.scopes.contains(&scope) {
            self.scopes.push(scope);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.scopes.iter()
    }

    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    pub fn contains(&self, scope: &Scope) -> bool {
        self.scopes.contains(scope)
    }

    pub fn resource_scopes(&self) -> impl Iterator<Item = &ResourceScope> {
        self.scopes.iter().filter_map(Scope::as_resource)
    }

    /// Keeps only the scopes for which `keep` is true.
    pub fn filter(&self, keep: impl Fn(&Scope) -> bool) -> ScopeSet {
        ScopeSet { scopes: self.scopes.iter().filter(|s| keep(s)).cloned().collect() }
    }

    /// Whether `interaction` on `resource_type` is granted in `ctx` for the whole type.
    pub fn allows(&self, ctx: Context, resource_type: &str, interaction: Interaction) -> bool {
        self.access(ctx, resource_type, interaction) == Access::Full
    }

    /// Like [`ScopeSet::allows`], but reports the granular filters that would grant it.
    pub fn access(&self, ctx: Context, resource_type: &str, interaction: Interaction) -> Access {
        let mut filters = Vec::new();
        for r in self.resource_scopes() {
            if r.context == ctx && r.matches_type(resource_type) && r.permissions.contains(interaction) {
                match &r.query {
                    None => return Access::Full,
                    Some(q) => filters.push(q.clone()),
                }
            }
        }
        if filters.is_empty() {
            Access::Denied
        } else {
            Access::Filtered(filters)
        }
    }

    /// The contexts in which the set grants `interaction` on the whole `resource_type`.
    pub fn contexts_allowing(&self, resource_type: &str, interaction: Interaction) -> Vec<Context> {
        Context::ALL.into_iter().filter(|c| self.allows(*c, resource_type, interaction)).collect()
    }

    /// Whether any resource scope is in `ctx` (e.g. a backend client's `system/…`).
    pub fn has_context(&self, ctx: Context) -> bool {
        self.resource_scopes().any(|r| r.context == ctx)
    }

    /// Whether some scope of the set grants everything `scope` grants.
    pub fn covers(&self, scope: &Scope) -> bool {
        self.scopes.iter().any(|s| scope.is_covered_by(s))
    }

    /// Whether `other` grants everything this set grants (refresh may narrow, never widen).
    pub fn is_subset_of(&self, other: &ScopeSet) -> bool {
        self.scopes.iter().all(|s| other.covers(s))
    }

    /// The part of this (requested) set that `allowed` (a client's registration) permits: a
    /// requested scope the registration covers is kept as written; a wider one is narrowed to
    /// its overlap with the registration; the rest is dropped.
    pub fn intersect_allowed(&self, allowed: &ScopeSet) -> ScopeSet {
        let mut out = ScopeSet::default();
        for s in &self.scopes {
            if allowed.covers(s) {
                out.insert(s.clone());
                continue;
            }
            if let Scope::Resource(r) = s {
                for a in allowed.resource_scopes() {
                    if let Some(i) = r.intersect(a) {
                        out.insert(Scope::Resource(i));
                    }
                }
            }
        }
        out
    }

    /// Whether any scope would give the app a refresh token.
    pub fn wants_refresh(&self) -> bool {
        self.contains(&Scope::OfflineAccess) || self.contains(&Scope::OnlineAccess)
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.scopes.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            s.fmt(f)?;
        }
        Ok(())
    }
}

impl Serialize for ScopeSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ScopeSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(ScopeSet::parse(&s))
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<T: IntoIterator<Item = Scope>>(iter: T) -> Self {
        ScopeSet::from_scopes(iter)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rs(s: &str) -> ResourceScope {
        match Scope::parse(s) {
            Scope::Resource(r) => r,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_v1() {
        let r = rs("patient/*.read");
        assert_eq!(r.context, Context::Patient);
        assert_eq!(r.resource_type, None);
        assert_eq!(r.permissions, Permissions::READ);
        assert_eq!(r.version, ScopeVersion::V1);
        let w = rs("user/Observation.write");
        assert_eq!(w.context, Context::User);
        assert_eq!(w.resource_type.as_deref(), Some("Observation"));
        assert_eq!(w.permissions, Permissions::WRITE);
        assert_eq!(rs("system/*.*").permissions, Permissions::ALL);
        for s in ["patient/*.read", "user/Observation.write", "system/*.*"] {
            assert_eq!(Scope::parse(s).to_string(), s);
        }
    }

    #[test]
    fn parses_v2() {
        let r = rs("patient/ExplanationOfBenefit.rs");
        assert_eq!(r.resource_type.as_deref(), Some("ExplanationOfBenefit"));
        assert_eq!(r.permissions, Permissions::READ);
        assert_eq!(r.version, ScopeVersion::V2);
        assert_eq!(rs("system/*.cruds").permissions, Permissions::ALL);
        assert_eq!(rs("user/Patient.cud").permissions, Permissions::WRITE);
        let c = rs("patient/Coverage.c");
        assert!(c.permissions.contains(Interaction::Create));
        assert!(!c.permissions.contains(Interaction::Read));
        for s in ["patient/ExplanationOfBenefit.rs", "system/*.cruds", "user/Patient.cud", "patient/Coverage.c"] {
            assert_eq!(Scope::parse(s).to_string(), s);
        }
    }

    #[test]
    fn parses_granular_queries() {
        let r =
            rs("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory");
        assert_eq!(
            r.query.as_deref(),
            Some("category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory")
        );
        assert_eq!(
            r.query_params(),
            vec![(
                "category".to_string(),
                "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_string()
            )]
        );
        let encoded = rs("patient/Observation.rs?category=a%7Cb&code=x");
        assert_eq!(encoded.query_params(), vec![("category".into(), "a|b".into()), ("code".into(), "x".into())]);
        assert_eq!(Scope::parse("patient/Observation.rs?category=x").to_string(), "patient/Observation.rs?category=x");
    }

    #[test]
    fn rejects_malformed_resource_scopes() {
        for s in [
            "patient/Observation.sr",              // out of order
            "patient/Observation.rr",              // repeated
            "patient/Observation.x",               // unknown letter
            "patient/Observation.",                // empty
            "patient/observation.read",            // lower-case type
            "clinic/Observation.read",             // unknown context
            "patient/Observation",                 // no permission
            "patient/Observation.read?category=x", // v1 has no granular form
            "patient/Observation.rs?",             // empty query
            "patient/Obs-ervation.rs",
        ] {
            assert!(matches!(Scope::parse(s), Scope::Other(_)), "{s} should not parse as a resource scope");
        }
    }

    #[test]
    fn parses_identity_and_launch_scopes() {
        let set = ScopeSet::parse("openid fhirUser profile launch launch/patient offline_access online_access");
        assert_eq!(
            set.iter().cloned().collect::<Vec<_>>(),
            vec![
                Scope::OpenId,
                Scope::FhirUser,
                Scope::Profile,
                Scope::Launch,
                Scope::LaunchPatient,
                Scope::OfflineAccess,
                Scope::OnlineAccess
            ]
        );
        assert_eq!(set.to_string(), "openid fhirUser profile launch launch/patient offline_access online_access");
        assert!(set.wants_refresh());
        assert_eq!(Scope::parse("launch/encounter"), Scope::Other("launch/encounter".into()));
    }

    #[test]
    fn dedupes_and_keeps_order() {
        let set = ScopeSet::parse("  openid  patient/*.rs openid\tpatient/*.rs ");
        assert_eq!(set.to_string(), "openid patient/*.rs");
        assert_eq!(set.len(), 2);
        assert!(ScopeSet::parse("").is_empty());
    }

    #[test]
    fn allows_by_context_type_and_interaction() {
        let set = ScopeSet::parse("patient/ExplanationOfBenefit.rs patient/Coverage.read user/Observation.write");
        assert!(set.allows(Context::Patient, "ExplanationOfBenefit", Interaction::Read));
        assert!(set.allows(Context::Patient, "ExplanationOfBenefit", Interaction::Search));
        assert!(!set.allows(Context::Patient, "ExplanationOfBenefit", Interaction::Create));
        assert!(!set.allows(Context::User, "ExplanationOfBenefit", Interaction::Read));
        assert!(set.allows(Context::Patient, "Coverage", Interaction::Search));
        assert!(!set.allows(Context::Patient, "Patient", Interaction::Read));
        assert!(set.allows(Context::User, "Observation", Interaction::Create));
        assert!(set.allows(Context::User, "Observation", Interaction::Update));
        assert!(set.allows(Context::User, "Observation", Interaction::Delete));
        assert!(!set.allows(Context::User, "Observation", Interaction::Read));

        let wild = ScopeSet::parse("system/*.rs");
        assert!(wild.allows(Context::System, "Claim", Interaction::Read));
        assert!(!wild.allows(Context::System, "Claim", Interaction::Update));
        assert!(!wild.allows(Context::Patient, "Claim", Interaction::Read));
        assert!(!ScopeSet::parse("openid fhirUser").allows(Context::Patient, "Patient", Interaction::Read));
    }

    #[test]
    fn v1_and_v2_mean_the_same() {
        for ctx in Context::ALL {
            for i in Interaction::ALL {
                let v1 = ScopeSet::parse(&format!("{ctx}/Observation.read"));
                let v2 = ScopeSet::parse(&format!("{ctx}/Observation.rs"));
                assert_eq!(v1.allows(ctx, "Observation", i), v2.allows(ctx, "Observation", i));
                let v1 = ScopeSet::parse(&format!("{ctx}/*.write"));
                let v2 = ScopeSet::parse(&format!("{ctx}/*.cud"));
                assert_eq!(v1.allows(ctx, "Coverage", i), v2.allows(ctx, "Coverage", i));
                let v1 = ScopeSet::parse(&format!("{ctx}/*.*"));
                let v2 = ScopeSet::parse(&format!("{ctx}/*.cruds"));
                assert!(v1.allows(ctx, "Coverage", i) && v2.allows(ctx, "Coverage", i));
            }
        }
        assert!(ScopeSet::parse("patient/*.read").is_subset_of(&ScopeSet::parse("patient/*.rs")));
        assert!(ScopeSet::parse("patient/*.rs").is_subset_of(&ScopeSet::parse("patient/*.read")));
    }

    #[test]
    fn granular_scopes_grant_nothing_through_allows() {
        let set = ScopeSet::parse("patient/Observation.rs?category=laboratory");
        assert!(!set.allows(Context::Patient, "Observation", Interaction::Search));
        assert_eq!(
            set.access(Context::Patient, "Observation", Interaction::Search),
            Access::Filtered(vec!["category=laboratory".to_string()])
        );
        assert_eq!(set.access(Context::Patient, "Condition", Interaction::Search), Access::Denied);
        assert!(set.contexts_allowing("Observation", Interaction::Read).is_empty());
        // A whole-type scope beside it wins.
        let both = ScopeSet::parse("patient/Observation.rs?category=laboratory patient/Observation.r");
        assert_eq!(both.access(Context::Patient, "Observation", Interaction::Read), Access::Full);
    }

    #[test]
    fn contexts_allowing_lists_every_context() {
        let set = ScopeSet::parse("patient/Coverage.rs system/*.read user/Observation.r");
        assert_eq!(set.contexts_allowing("Coverage", Interaction::Read), vec![Context::Patient, Context::System]);
        assert_eq!(set.contexts_allowing("Observation", Interaction::Read), vec![Context::User, Context::System]);
        assert_eq!(set.contexts_allowing("Observation", Interaction::Search), vec![Context::System]);
        assert!(set.contexts_allowing("Observation", Interaction::Delete).is_empty());
        assert!(set.has_context(Context::System) && set.has_context(Context::User));
        assert!(!ScopeSet::parse("openid patient/*.rs").has_context(Context::System));
    }

    #[test]
    fn subset_for_refresh_narrowing() {
        let granted = ScopeSet::parse("openid fhirUser launch/patient offline_access patient/*.rs");
        assert!(ScopeSet::parse("patient/Coverage.rs").is_subset_of(&granted));
        assert!(ScopeSet::parse("patient/Coverage.r openid").is_subset_of(&granted));
        assert!(ScopeSet::parse("patient/Observation.rs?category=laboratory").is_subset_of(&granted));
        assert!(ScopeSet::parse("").is_subset_of(&granted));
        assert!(granted.is_subset_of(&granted));
        // Widening in every dimension is refused.
        assert!(!ScopeSet::parse("patient/Coverage.cruds").is_subset_of(&granted));
        assert!(!ScopeSet::parse("user/Coverage.rs").is_subset_of(&granted));
        assert!(!ScopeSet::parse("system/*.rs").is_subset_of(&granted));
        assert!(!ScopeSet::parse("profile").is_subset_of(&granted));
        assert!(!ScopeSet::parse("online_access").is_subset_of(&granted));
        // A granular grant does not cover the whole type, nor another filter.
        let granular = ScopeSet::parse("patient/Observation.rs?category=laboratory");
        assert!(!ScopeSet::parse("patient/Observation.rs").is_subset_of(&granular));
        assert!(!ScopeSet::parse("patient/Observation.rs?category=vital-signs").is_subset_of(&granular));
        assert!(ScopeSet::parse("patient/Observation.r?category=laboratory").is_subset_of(&granular));
    }

    #[test]
    fn intersect_allowed_keeps_narrows_and_drops() {
        let allowed = ScopeSet::parse(
            "openid fhirUser launch/patient offline_access patient/ExplanationOfBenefit.rs patient/Coverage.rs",
        );
        // Covered scopes are kept as written.
        let req = ScopeSet::parse("openid launch/patient patient/Coverage.read");
        assert_eq!(req.intersect_allowed(&allowed).to_string(), "openid launch/patient patient/Coverage.read");
        // Wider scopes are narrowed to what the registration allows; unknown ones dropped.
        let req = ScopeSet::parse("patient/*.cruds profile something-else system/*.rs");
        assert_eq!(req.intersect_allowed(&allowed).to_string(), "patient/ExplanationOfBenefit.rs patient/Coverage.rs");
        // v1 requests narrowed to a v1-expressible result stay v1.
        let allowed_v1 = ScopeSet::parse("patient/*.read");
        assert_eq!(
            ScopeSet::parse("patient/Observation.*").intersect_allowed(&allowed_v1).to_string(),
            "patient/Observation.read"
        );
        assert_eq!(
            ScopeSet::parse("patient/Observation.rs").intersect_allowed(&allowed_v1).to_string(),
            "patient/Observation.rs"
        );
        // Permissions that v1 cannot express come out in v2.
        let allowed_r = ScopeSet::parse("patient/*.r");
        assert_eq!(
            ScopeSet::parse("patient/Observation.read").intersect_allowed(&allowed_r).to_string(),
            "patient/Observation.r"
        );
        // Granular requests against a whole-type registration keep their filter.
        let req = ScopeSet::parse("patient/Observation.rs?category=laboratory");
        assert_eq!(req.intersect_allowed(&allowed_v1).to_string(), "patient/Observation.rs?category=laboratory");
        // Nothing in common.
        assert!(ScopeSet::parse("user/*.rs").intersect_allowed(&allowed).is_empty());
        // The result never exceeds the registration.
        let req = ScopeSet::parse("patient/*.* user/*.* system/*.* openid fhirUser profile offline_access");
        assert!(req.intersect_allowed(&allowed).is_subset_of(&allowed));
    }

    #[test]
    fn describes_in_plain_words() {
        assert_eq!(
            describe("patient/ExplanationOfBenefit.rs"),
            "See and search your claims and explanations of benefits (ExplanationOfBenefit)"
        );
        assert_eq!(describe("patient/*.read"), "See and search all your health plan records");
        assert_eq!(describe("user/Coverage.rs"), "See and search insurance coverage you are allowed to see (Coverage)");
        assert_eq!(describe("patient/Coverage.cud"), "Add to, change and delete your insurance coverage (Coverage)");
        assert!(describe("patient/Observation.rs?category=laboratory").ends_with(", limited to category = laboratory"));
        assert_eq!(describe("system/Claim.r"), "See every member's claims and prior authorization requests (Claim)");
        assert!(describe("offline_access").contains("not using the app"));
        assert!(describe("openid").contains("who you are"));
        assert!(describe("foo").contains("foo"));
        assert!(describe("patient/Basic.s").starts_with("Search your Basic records"));
    }

    #[test]
    fn serde_round_trip() {
        let set = ScopeSet::parse("openid patient/*.rs");
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, "\"openid patient/*.rs\"");
        let back: ScopeSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, set);
    }
}
