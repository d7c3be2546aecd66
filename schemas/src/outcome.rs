//! FHIR R4 OperationOutcome builders. Every error payerx returns over HTTP or records on a
//! dead-letter topic is one of these, naming the element at fault in `expression`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssueSeverity {
    Fatal,
    Error,
    Warning,
    Information,
}

/// The `issue.code` value set (http://hl7.org/fhir/issue-type), the codes payerx uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssueType {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Forbidden,
    Processing,
    NotSupported,
    Duplicate,
    NotFound,
    Deleted,
    TooLong,
    Conflict,
    Transient,
    Timeout,
    Throttled,
    Exception,
    Informational,
    Incomplete,
    BusinessRule,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Issue {
    pub severity: IssueSeverity,
    pub code: IssueType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expression: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationOutcome {
    pub issue: Vec<Issue>,
}

impl OperationOutcome {
    pub fn new(severity: IssueSeverity, code: IssueType, diagnostics: impl Into<String>) -> Self {
        OperationOutcome {
            issue: vec![Issue { severity, code, diagnostics: Some(diagnostics.into()), expression: vec![] }],
        }
    }

    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self::new(IssueSeverity::Error, code, diagnostics)
    }

    pub fn information(diagnostics: impl Into<String>) -> Self {
        Self::new(IssueSeverity::Information, IssueType::Informational, diagnostics)
    }

    /// Names the element at fault (FHIRPath, e.g. `Patient.birthDate`) on the last issue.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        if let Some(last) = self.issue.last_mut() {
            last.expression.push(expression.into());
        }
        self
    }

    pub fn push(&mut self, issue: Issue) {
        self.issue.push(issue);
    }

    pub fn is_error(&self) -> bool {
        self.issue.iter().any(|i| matches!(i.severity, IssueSeverity::Error | IssueSeverity::Fatal))
    }

    /// The first issue's diagnostics, for logs and dead-letter headers.
    pub fn summary(&self) -> String {
        self.issue
            .first()
            .map(|i| match (&i.diagnostics, i.expression.first()) {
                (Some(d), Some(e)) if !d.starts_with(e.as_str()) => format!("{e}: {d}"),
                (Some(d), _) => d.clone(),
                (None, Some(e)) => e.clone(),
                (None, None) => format!("{:?}", i.code),
            })
            .unwrap_or_default()
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({"resourceType": "OperationOutcome"});
        let issues = serde_json::to_value(&self.issue).unwrap_or(Value::Array(vec![]));
        v["issue"] = issues;
        v
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        serde_json::from_value(v.clone()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_as_fhir() {
        let oo = OperationOutcome::error(IssueType::Value, "not a valid date").at("Patient.birthDate");
        let v = oo.to_json();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["code"], "value");
        assert_eq!(v["issue"][0]["expression"][0], "Patient.birthDate");
        assert_eq!(OperationOutcome::from_json(&v), Some(oo.clone()));
        assert_eq!(oo.summary(), "Patient.birthDate: not a valid date");
        assert_eq!(
            OperationOutcome::error(IssueType::NotSupported, "x").to_json()["issue"][0]["code"],
            "not-supported"
        );
    }
}
