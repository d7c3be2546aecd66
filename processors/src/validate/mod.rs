//! Structural validation of FHIR R4 JSON resources, driven by the element table generated from
//! the official R4 (4.0.1) StructureDefinitions (`processors/data/r4-elements.tsv`, made by
//! `scripts/gen-r4-elements.py`).
//!
//! Enforced (<http://hl7.org/fhir/R4/json.html> and the base definitions):
//! - `resourceType` present and a concrete R4 resource type; `id` matches the R4 id grammar;
//! - every property is an element of its type (datatype, resource or backbone element), with
//!   choice elements (`value[x]` as `valueString`, `valueQuantity`, ...: only the allowed types,
//!   and at most one of them) and `_x` primitive-extension siblings (objects, or arrays of
//!   objects/nulls lined up with the value array for repeating primitives);
//! - max cardinality: `*` elements are arrays, `1` elements are not;
//! - min cardinality of the base definitions (resources, backbone elements and datatypes), a
//!   primitive present only through its `_x` extension counting as present;
//! - no empty objects, arrays or strings, no `null` except inside primitive arrays paired with a
//!   `_x` array;
//! - primitive JSON types and formats: booleans, integers in range, decimals as JSON numbers,
//!   every other primitive a string matching its R4 grammar (date, dateTime, instant, time, id,
//!   code, oid, uuid, uri/url/canonical, base64Binary, xhtml);
//! - recursion into complex types, backbone elements, `contained`, `Bundle.entry.resource`,
//!   `Parameters.parameter.resource` and any other element typed Resource;
//! - extensions are Extension datatypes: a `url` (required) and at most one `value[x]`.
//!
//! Not enforced, deliberately: invariants (FHIRPath constraints such as ele-1, ext-1, dom-2..6),
//! terminology bindings, profiles (`meta.profile`, e.g. CARIN BB must-support and slicing),
//! reference targets and resolution, string length limits, xhtml content rules beyond "a div".

mod primitive;
mod table;
mod tape;
mod tree;

#[cfg(test)]
mod tests;

use schemas::outcome::{Issue, IssueSeverity, IssueType};
use serde_json::Value;

use primitive::{JsonRepr, Prim};
use table::{Elem, Index, Kind, Max, Slot};
use tree::{Tree, View};

pub use tape::{short_escape, surrogate_pair, Json};

/// Issues reported per resource at most.
pub const MAX_ISSUES: usize = 100;

/// How deep objects may nest before validation gives up on a branch.
const MAX_DEPTH: usize = 96;

/// Checks that `resource` is a well-formed FHIR R4 resource (JSON representation rules, element
/// names, cardinality, primitive formats), recursing into complex types, contained resources and
/// Bundle entry resources. Returns every problem found (bounded to the first 100), each naming the
/// element by FHIRPath-like expression, e.g. `Patient.birthDate`, `Patient.name[0].given[1]`,
/// `ExplanationOfBenefit.item[2].servicedDate`.
pub fn validate_resource(resource: &Value) -> Result<(), Vec<Issue>> {
    walk(resource)
}

/// [`validate_resource`] over a tree parsed with [`Json::parse`]: the same rules and issues,
/// without building a `serde_json::Value` first.
pub fn validate_json(resource: &Json) -> Result<(), Vec<Issue>> {
    walk(resource.root())
}

fn walk<'a, T: Tree<'a>>(resource: T) -> Result<(), Vec<Issue>> {
    let mut w = Walker {
        idx: Index::get(),
        _tree: std::marker::PhantomData,
        path: Vec::with_capacity(16),
        issues: Vec::new(),
        depth: 0,
    };
    w.resource(resource);
    if w.issues.is_empty() {
        Ok(())
    } else {
        Err(w.issues)
    }
}

/// Whether `name` is an R4 (4.0.1) resource type (the concrete ones: not Resource/DomainResource).
pub fn is_resource_type(name: &str) -> bool {
    Index::get().resources.contains(name)
}

/// Every R4 resource type, sorted (for the CapabilityStatement).
pub fn resource_types() -> impl Iterator<Item = &'static str> {
    let mut all: Vec<&'static str> = Index::get().resources.iter().copied().collect();
    all.sort_unstable();
    all.into_iter()
}

/// Whether `id` is a valid FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    primitive::is_valid_id(id)
}

/// One step of the path to the element being checked; formatted only when an issue is reported.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Idx(usize),
}

struct Walker<'a, T: Tree<'a>> {
    idx: &'static Index,
    _tree: std::marker::PhantomData<T>,
    path: Vec<Seg<'a>>,
    issues: Vec<Issue>,
    depth: usize,
}

fn json_kind<'a, T: Tree<'a>>(v: T) -> &'static str {
    match v.view() {
        View::Null => "null",
        View::Bool(_) => "a boolean",
        View::Number(_) => "a number",
        View::String(_) => "a string",
        View::Array(_) => "an array",
        View::Object(_) => "an object",
    }
}

/// A short rendering of a value for diagnostics.
fn show<'a, T: Tree<'a>>(v: T) -> String {
    match v.view() {
        View::String(s) => quote(s),
        View::Array(_) => "[...]".to_string(),
        View::Object(_) => "{...}".to_string(),
        View::Null => "null".to_string(),
        View::Bool(b) => b.to_string(),
        View::Number(n) => n.to_string(),
    }
}

fn quote(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        format!("'{s}'")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("'{cut}...'")
    }
}

fn cardinality(min: u32, max: Max) -> String {
    match max {
        Max::Zero => format!("{min}..0"),
        Max::One => format!("{min}..1"),
        Max::Many => format!("{min}..*"),
        Max::N(n) => format!("{min}..{n}"),
    }
}

impl<'a, T: Tree<'a>> Walker<'a, T> {
    // ---- paths and issues -------------------------------------------------------------------

    fn path_string(&self) -> String {
        let mut s = String::with_capacity(64);
        for seg in &self.path {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Idx(i) => {
                    s.push('[');
                    s.push_str(&i.to_string());
                    s.push(']');
                }
            }
        }
        s
    }

    fn child_path(&self, name: &str) -> String {
        let mut s = self.path_string();
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(name);
        s
    }

    fn full(&self) -> bool {
        self.issues.len() >= MAX_ISSUES
    }

    fn report(&mut self, code: IssueType, expression: String, diagnostics: String) {
        if self.full() {
            return;
        }
        let expression = if expression.is_empty() { vec![] } else { vec![expression] };
        self.issues.push(Issue { severity: IssueSeverity::Error, code, diagnostics: Some(diagnostics), expression });
    }

    /// An issue about the element at the current path.
    fn here(&mut self, code: IssueType, diagnostics: String) {
        let path = self.path_string();
        self.report(code, path, diagnostics);
    }

    /// "Patient" at a resource root, "Patient.contact[0] (Patient.contact)" deeper.
    fn describe_owner(&self, type_name: &str) -> String {
        let path = self.path_string();
        if path == type_name {
            path
        } else {
            format!("{path} ({type_name})")
        }
    }

    // ---- resources ----------------------------------------------------------------------------

    /// A resource: the root, or nested (contained, Bundle.entry.resource, ...) at the current path.
    fn resource(&mut self, v: T) {
        let root = self.path.is_empty();
        let View::Object(obj) = v.view() else {
            let what = if root { "A resource".to_string() } else { self.path_string() };
            self.here(
                IssueType::Structure,
                format!("{what} must be a JSON object (a FHIR resource), found {}", json_kind(v)),
            );
            return;
        };
        let where_ = if root { "The resource".to_string() } else { self.path_string() };
        let rt_value = T::get(obj, "resourceType");
        let rt = match rt_value.map(T::view) {
            None => {
                self.here(IssueType::Required, format!("{where_} has no resourceType"));
                return;
            }
            Some(View::String(s)) => s,
            Some(_) => {
                let other = rt_value.map_or("null", json_kind);
                let p = self.child_path("resourceType");
                self.report(
                    IssueType::Invalid,
                    p,
                    format!(
                        "{}resourceType must be a string naming an R4 resource type, found {}",
                        if root { String::new() } else { format!("{where_}: ") },
                        other
                    ),
                );
                return;
            }
        };
        let ty = match self.idx.type_id(rt) {
            Some(ty) if self.idx.resources.contains(rt) => ty,
            _ => {
                let p = self.child_path("resourceType");
                let at = if root { String::new() } else { format!("{where_}: ") };
                let why = if self.idx.abstract_resources.contains(rt) {
                    format!("{at}'{rt}' is an abstract type, not a resource type")
                } else {
                    format!("{at}Unknown resourceType {}: not an R4 (4.0.1) resource type", quote(rt))
                };
                self.report(IssueType::Invalid, p, why);
                return;
            }
        };
        if root {
            self.path.push(Seg::Key(self.idx.types[ty as usize].name));
        }
        self.object(obj, ty, true);
        if root {
            self.path.pop();
        }
    }

    // ---- objects --------------------------------------------------------------------------------

    /// The properties of an object of type `ty` (its path is the current path).
    fn object(&mut self, obj: T::Obj, ty: u16, is_resource: bool) {
        if self.depth >= MAX_DEPTH {
            self.here(
                IssueType::Structure,
                format!("{} is nested too deeply (more than {MAX_DEPTH} levels)", self.path_string()),
            );
            return;
        }
        self.depth += 1;
        let idx = self.idx;
        let td = &idx.types[ty as usize];
        let mut seen: u128 = 0;
        // choice elements present: (slot, JSON name without '_')
        let mut chosen: [(u16, &'a str); 8] = [(u16::MAX, ""); 8];
        let mut n_chosen = 0usize;

        for (key, v) in T::members(obj) {
            if self.full() {
                break;
            }
            if is_resource && key == "resourceType" {
                continue;
            }
            let (name, is_ext) = match key.strip_prefix('_') {
                Some(base) => (base, true),
                None => (key, false),
            };
            let Some(elem) = td.elems.get(name) else {
                let owner = self.describe_owner(td.name);
                let p = self.child_path(key);
                self.report(IssueType::Structure, p, format!("Unknown element '{key}' in {owner}"));
                continue;
            };
            let slot = &td.slots[elem.slot as usize];
            if elem.max == Max::Zero {
                let p = self.child_path(name);
                self.report(
                    IssueType::Structure,
                    p,
                    format!(
                        "{} is not allowed here (cardinality {})",
                        self.child_path(name),
                        cardinality(slot.min, slot.max)
                    ),
                );
                continue;
            }
            if is_ext && !matches!(elem.kind, Kind::Prim(_)) {
                let p = self.child_path(name);
                self.report(
                    IssueType::Structure,
                    p,
                    format!("'{key}' is not allowed: {} is not a primitive element (put extensions inside the element instead)", self.child_path(name)),
                );
                continue;
            }
            if elem.choice {
                match chosen[..n_chosen].iter().find(|(s, _)| *s == elem.slot) {
                    Some((_, other)) if *other != name => {
                        let p = self.child_path(slot.name.trim_end_matches("[x]"));
                        let other = *other;
                        self.report(
                            IssueType::Structure,
                            p,
                            format!(
                                "{} has more than one value: '{other}' and '{name}' (a choice element takes one type)",
                                self.child_path(slot.name)
                            ),
                        );
                        continue;
                    }
                    Some(_) => {}
                    None if n_chosen < chosen.len() => {
                        chosen[n_chosen] = (elem.slot, name);
                        n_chosen += 1;
                    }
                    None => {}
                }
            }
            seen |= 1u128 << elem.slot;
            self.path.push(Seg::Key(name));
            if is_ext {
                self.primitive_extension(obj, name, key, v, elem);
            } else {
                self.element(obj, name, v, elem, slot);
            }
            self.path.pop();
        }

        for &s in &td.required {
            if self.full() {
                break;
            }
            if seen & (1u128 << s) == 0 {
                let slot = &td.slots[s as usize];
                let p = self.child_path(slot.name.trim_end_matches("[x]"));
                let what = if slot.name.ends_with("[x]") {
                    format!(" (one of {})", choice_names(slot))
                } else {
                    String::new()
                };
                self.report(
                    IssueType::Required,
                    p.clone(),
                    format!("{p}: missing required element{what} (cardinality {})", cardinality(slot.min, slot.max)),
                );
            }
        }
        self.depth -= 1;
    }

    /// The value of JSON property `name` (not `_name`), at the current path.
    fn element(&mut self, parent: T::Obj, name: &str, v: T, elem: Elem, slot: &Slot) {
        match v.view() {
            View::Array(items) => {
                if !elem.max.is_array() {
                    self.here(
                        IssueType::Structure,
                        format!(
                            "{} must not be an array (cardinality {})",
                            self.path_string(),
                            cardinality(slot.min, slot.max)
                        ),
                    );
                    return;
                }
                let len = T::len(items);
                if len == 0 {
                    self.here(
                        IssueType::Structure,
                        format!("{} must not be an empty array (omit the element instead)", self.path_string()),
                    );
                    return;
                }
                if let Max::N(n) = elem.max {
                    if len > n as usize {
                        self.here(
                            IssueType::Structure,
                            format!("{} has {} entries, at most {n} are allowed", self.path_string(), len),
                        );
                    }
                }
                if (len as u64) < u64::from(slot.min) {
                    self.here(
                        IssueType::Required,
                        format!("{} has {} entries, at least {} are required", self.path_string(), len, slot.min),
                    );
                }
                // `_name`, read in step with this array once a null needs it (a tape array has
                // no random access, and looking up each index would be quadratic).
                let mut beside = None;
                for (i, item) in T::items(items).enumerate() {
                    if self.full() {
                        return;
                    }
                    self.path.push(Seg::Idx(i));
                    if matches!(item.view(), View::Null) {
                        let paired = matches!(elem.kind, Kind::Prim(_))
                            .then(|| {
                                beside
                                    .get_or_insert_with(|| {
                                        Lockstep::new(array_items(T::get(parent, &format!("_{name}"))))
                                    })
                                    .at(i)
                            })
                            .flatten();
                        self.null_in_array(name, i, elem, paired);
                    } else {
                        self.value(item, elem.kind);
                    }
                    self.path.pop();
                }
            }
            _ if elem.max.is_array() => {
                self.here(
                    IssueType::Structure,
                    format!(
                        "{} must be an array (cardinality {})",
                        self.path_string(),
                        cardinality(slot.min, slot.max)
                    ),
                );
            }
            View::Null => {
                self.here(
                    IssueType::Structure,
                    format!("{} is null: null is not allowed (omit the element instead)", self.path_string()),
                );
            }
            _ => self.value(v, elem.kind),
        }
    }

    /// `null` at `name[i]`: only allowed for a primitive whose `_name[i]` (`paired`) carries
    /// id/extensions.
    fn null_in_array(&mut self, name: &str, i: usize, elem: Elem, paired: Option<T>) {
        if !matches!(elem.kind, Kind::Prim(_)) {
            self.here(
                IssueType::Structure,
                format!("{} is null: null is only allowed in arrays of primitive values", self.path_string()),
            );
            return;
        }
        if !paired.is_some_and(|v| matches!(v.view(), View::Object(_))) {
            self.here(
                IssueType::Structure,
                format!("{} is null: a null value needs an id or extension at _{name}[{i}]", self.path_string()),
            );
        }
    }

    /// One value (not an array) of the given kind, at the current path.
    fn value(&mut self, v: T, kind: Kind) {
        match kind {
            Kind::Prim(p) => self.primitive(v, p),
            Kind::Resource => self.resource(v),
            Kind::Complex(t) => match v.view() {
                View::Object(o) if T::is_empty(o) => {
                    self.here(
                        IssueType::Structure,
                        format!("{} is an empty object: an element must have content", self.path_string()),
                    );
                }
                View::Object(o) => self.object(o, t, false),
                View::Null => {
                    self.here(
                        IssueType::Structure,
                        format!("{} is null: null is not allowed (omit the element instead)", self.path_string()),
                    );
                }
                _ => {
                    let other = v;
                    let tn = self.idx.types[t as usize].name;
                    let tn = if tn.contains('.') { "a backbone element" } else { tn };
                    self.here(
                        IssueType::Structure,
                        format!("{} must be a JSON object ({tn}), found {}", self.path_string(), json_kind(other)),
                    );
                }
            },
        }
    }

    fn primitive(&mut self, v: T, p: Prim) {
        match (p.repr(), v.view()) {
            (JsonRepr::Bool, View::Bool(_)) => {}
            (JsonRepr::Number, View::Number(_)) => {}
            (JsonRepr::Integer, View::Number(n)) => {
                let (lo, hi) = p.int_range();
                match n.as_i64() {
                    Some(i) if (lo..=hi).contains(&i) => {}
                    Some(_) => {
                        let range = if hi == i64::from(i32::MAX) && lo == i64::from(i32::MIN) {
                            "-2147483648..2147483647".to_string()
                        } else {
                            format!("{lo}..{hi}")
                        };
                        self.here(
                            IssueType::Value,
                            format!("{}: {n} is out of range for a FHIR {} ({range})", self.path_string(), p.code()),
                        );
                    }
                    None if n.is_u64() => {
                        self.here(
                            IssueType::Value,
                            format!("{}: {n} is out of range for a FHIR {}", self.path_string(), p.code()),
                        );
                    }
                    None => {
                        self.here(
                            IssueType::Value,
                            format!("{}: {n} is not a valid FHIR {} (a whole number)", self.path_string(), p.code()),
                        );
                    }
                }
            }
            (JsonRepr::String, View::String(s)) => {
                if s.is_empty() {
                    self.here(
                        IssueType::Value,
                        format!(
                            "{}: empty string is not a valid FHIR {} (omit the element instead)",
                            self.path_string(),
                            p.code()
                        ),
                    );
                } else if !p.check_str(s) {
                    self.here(
                        IssueType::Value,
                        format!("{}: {} is not a valid FHIR {} ({})", self.path_string(), quote(s), p.code(), p.hint()),
                    );
                }
            }
            (repr, View::Null) => {
                let _ = repr;
                self.here(
                    IssueType::Structure,
                    format!("{} is null: null is not allowed (omit the element instead)", self.path_string()),
                );
            }
            (repr, _) => {
                let other = v;
                let want = match repr {
                    JsonRepr::Bool => "a JSON boolean (true or false)",
                    JsonRepr::Integer => "a JSON integer",
                    JsonRepr::Number => "a JSON number",
                    JsonRepr::String => "a JSON string",
                };
                self.here(
                    IssueType::Structure,
                    format!(
                        "{} is a FHIR {} and must be {want}, found {} {}",
                        self.path_string(),
                        p.code(),
                        json_kind(other),
                        show(other)
                    ),
                );
            }
        }
    }

    /// `_name` (the current path is `name`): the primitive's id/extensions.
    fn primitive_extension(&mut self, parent: T::Obj, name: &str, key: &str, v: T, elem: Elem) {
        let element = self.idx.element;
        match v.view() {
            View::Object(o) => {
                if elem.max.is_array() {
                    self.here(
                        IssueType::Structure,
                        format!("'{key}' must be an array lined up with '{name}' ({} repeats)", self.path_string()),
                    );
                } else if T::is_empty(o) {
                    self.here(
                        IssueType::Structure,
                        format!("'{key}' is an empty object: it must carry an id or extensions"),
                    );
                } else {
                    self.object(o, element, false);
                }
            }
            View::Array(items) => {
                if !elem.max.is_array() {
                    self.here(
                        IssueType::Structure,
                        format!("'{key}' must not be an array: {} does not repeat", self.path_string()),
                    );
                    return;
                }
                if T::len(items) == 0 {
                    self.here(IssueType::Structure, format!("'{key}' must not be an empty array (omit it instead)"));
                    return;
                }
                let values = T::get(parent, name).and_then(|vs| match vs.view() {
                    View::Array(vs) => Some(vs),
                    _ => None,
                });
                if let Some(values) = values {
                    if T::len(values) != T::len(items) {
                        self.here(
                            IssueType::Structure,
                            format!(
                                "'{key}' has {} entries but '{name}' has {}: they must line up one to one",
                                T::len(items),
                                T::len(values)
                            ),
                        );
                    }
                }
                let mut beside = Lockstep::new(values.into_iter().flat_map(T::items));
                for (i, item) in T::items(items).enumerate() {
                    if self.full() {
                        return;
                    }
                    self.path.push(Seg::Idx(i));
                    let view = item.view();
                    let value_here = matches!(view, View::Null).then(|| beside.at(i)).flatten();
                    match view {
                        // null beside a null value is reported with the value (null_in_array)
                        View::Null if value_here.is_none() => {
                            self.here(
                                IssueType::Structure,
                                format!("{} has neither a value nor extensions ('{key}[{i}]' is null and there is no '{name}[{i}]')", self.path_string()),
                            );
                        }
                        View::Null => {}
                        View::Object(o) if T::is_empty(o) => {
                            self.here(
                                IssueType::Structure,
                                format!(
                                    "'{key}[{i}]' is an empty object: use null where an entry has no id or extensions"
                                ),
                            );
                        }
                        View::Object(o) => self.object(o, element, false),
                        _ => {
                            let other = item;
                            self.here(
                                IssueType::Structure,
                                format!(
                                    "'{key}[{i}]' must be a JSON object (id/extension) or null, found {}",
                                    json_kind(other)
                                ),
                            );
                        }
                    }
                    self.path.pop();
                }
            }
            _ => {
                self.here(
                    IssueType::Structure,
                    format!(
                        "'{key}' must be a JSON object holding the id/extensions of {}, found {}",
                        self.path_string(),
                        json_kind(v)
                    ),
                );
            }
        }
    }
}

/// The items of `v` when it is an array; none otherwise.
fn array_items<'a, T: Tree<'a>>(v: Option<T>) -> impl Iterator<Item = T> + use<'a, T> {
    v.and_then(|v| match v.view() {
        View::Array(items) => Some(items),
        _ => None,
    })
    .into_iter()
    .flat_map(T::items)
}

/// Items of a sibling array looked up by the index of the array being walked, which only grows:
/// each is reached by stepping forward, so a whole walk is linear even without random access.
struct Lockstep<I> {
    items: I,
    next: usize,
}

impl<I: Iterator> Lockstep<I> {
    fn new(items: I) -> Self {
        Lockstep { items, next: 0 }
    }

    /// The item at `i` (`None` past the end, or for an index already passed).
    fn at(&mut self, i: usize) -> Option<I::Item> {
        let skip = i.checked_sub(self.next)?;
        self.next = i + 1;
        self.items.nth(skip)
    }
}

/// `valueString, valueQuantity, ...` for a choice slot.
fn choice_names(slot: &Slot) -> String {
    let prefix = slot.name.trim_end_matches("[x]");
    slot.types
        .split('|')
        .map(|t| {
            let mut c = t.chars();
            match c.next() {
                Some(f) => format!("{prefix}{}{}", f.to_uppercase(), c.as_str()),
                None => prefix.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
