//! The JSON trees the validator walks: `serde_json::Value`, and the tape [`Json`](super::Json) that borrows
//! from the text it was parsed from. The walker sees both through [`Tree`], so it gives the same
//! answer over either.

use std::fmt;

use serde_json::{Map, Number, Value};

use super::tape;

/// One node of a JSON tree, as the validator sees it.
pub(crate) enum View<'a, T: Tree<'a>> {
    Null,
    Bool(bool),
    Number(Num<'a>),
    String(&'a str),
    Array(T::Arr),
    Object(T::Obj),
}

/// A JSON number: parsed (`Value`), or as written (the tape parses it only when a range check or
/// a message needs it).
#[derive(Clone, Copy)]
pub(crate) enum Num<'a> {
    Parsed(&'a Number),
    Text(&'a str),
}

impl Num<'_> {
    /// As `Number::as_i64` (so `-0` and `1.0` are not whole numbers, as in serde_json).
    pub(crate) fn as_i64(self) -> Option<i64> {
        match self {
            Num::Parsed(n) => n.as_i64(),
            Num::Text(t) => tape::number(t)?.as_i64(),
        }
    }

    pub(crate) fn is_u64(self) -> bool {
        match self {
            Num::Parsed(n) => n.is_u64(),
            Num::Text(t) => tape::number(t).is_some_and(|n| n.is_u64()),
        }
    }
}

/// As serde_json prints the number (`1E+2` as `100.0`), so messages match over either tree.
impl fmt::Display for Num<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Num::Parsed(n) => n.fmt(f),
            Num::Text(t) => match tape::number(t) {
                Some(n) => n.fmt(f),
                None => f.write_str(t),
            },
        }
    }
}

/// A handle on a node of a JSON tree the validator can walk.
pub(crate) trait Tree<'a>: Copy + 'a {
    type Arr: Copy;
    type Obj: Copy;
    fn view(self) -> View<'a, Self>;
    fn len(items: Self::Arr) -> usize;
    fn items(items: Self::Arr) -> impl Iterator<Item = Self>;
    fn get(object: Self::Obj, key: &str) -> Option<Self>;
    /// Members in document order, each key once (as `serde_json::Value` keeps them).
    fn members(object: Self::Obj) -> impl Iterator<Item = (&'a str, Self)>;
    fn is_empty(object: Self::Obj) -> bool;
}

impl<'a> Tree<'a> for &'a Value {
    type Arr = &'a [Value];
    type Obj = &'a Map<String, Value>;

    fn view(self) -> View<'a, Self> {
        match self {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Number(n) => View::Number(Num::Parsed(n)),
            Value::String(s) => View::String(s),
            Value::Array(items) => View::Array(items.as_slice()),
            Value::Object(o) => View::Object(o),
        }
    }

    fn len(items: Self::Arr) -> usize {
        items.len()
    }

    fn items(items: Self::Arr) -> impl Iterator<Item = Self> {
        items.iter()
    }

    fn get(object: Self::Obj, key: &str) -> Option<Self> {
        object.get(key)
    }

    fn members(object: Self::Obj) -> impl Iterator<Item = (&'a str, Self)> {
        object.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn is_empty(object: Self::Obj) -> bool {
        object.is_empty()
    }
}

impl<'d, 'a: 'd> Tree<'d> for tape::Node<'d, 'a> {
    type Arr = tape::Array<'d, 'a>;
    type Obj = tape::Object<'d, 'a>;

    fn view(self) -> View<'d, Self> {
        tape::Node::view(self)
    }

    fn len(items: Self::Arr) -> usize {
        items.len()
    }

    fn items(items: Self::Arr) -> impl Iterator<Item = Self> {
        items.iter()
    }

    fn get(object: Self::Obj, key: &str) -> Option<Self> {
        object.get(key)
    }

    fn members(object: Self::Obj) -> impl Iterator<Item = (&'d str, Self)> {
        object.members()
    }

    fn is_empty(object: Self::Obj) -> bool {
        object.is_empty()
    }
}
