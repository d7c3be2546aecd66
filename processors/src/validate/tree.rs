//! The JSON trees the validator walks: `serde_json::Value`, and [`Json`], a tree that borrows its
//! strings from the text it was parsed from.
//!
//! `payerx load` and the validate processor check resources they keep as text: building a
//! `serde_json::Value` for that (an owned `String` per key and value, a hash map per object) cost
//! more than the check itself. [`Json`] holds the same information, so the walker gives the same
//! answer over either tree.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// One node of a JSON tree, as the validator sees it.
pub(crate) enum View<'a, T: Tree> {
    Null,
    Bool(bool),
    Number(&'a Number),
    String(&'a str),
    Array(&'a [T]),
    Object(&'a T::Obj),
}

/// A JSON tree the validator can walk.
pub(crate) trait Tree: Sized {
    type Obj;
    fn view(&self) -> View<'_, Self>;
    fn get<'a>(object: &'a Self::Obj, key: &str) -> Option<&'a Self>;
    fn members<'a>(object: &'a Self::Obj) -> impl Iterator<Item = (&'a str, &'a Self)>
    where
        Self: 'a;
    fn is_empty(object: &Self::Obj) -> bool;
}

impl Tree for Value {
    type Obj = Map<String, Value>;

    fn view(&self) -> View<'_, Self> {
        match self {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Number(n) => View::Number(n),
            Value::String(s) => View::String(s),
            Value::Array(items) => View::Array(items),
            Value::Object(o) => View::Object(o),
        }
    }

    fn get<'a>(object: &'a Self::Obj, key: &str) -> Option<&'a Self> {
        object.get(key)
    }

    fn members<'b>(object: &'b Self::Obj) -> impl Iterator<Item = (&'b str, &'b Self)>
    where
        Self: 'b,
    {
        object.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn is_empty(object: &Self::Obj) -> bool {
        object.is_empty()
    }
}

/// A parsed JSON document whose strings borrow from its text where they have no escapes.
/// Objects keep their members in document order; a repeated key keeps its first position and its
/// last value, as `serde_json::Value` does.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// Parses `text` (one JSON document; surrounding whitespace allowed).
    pub fn parse(text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}

impl<'a> Tree for Json<'a> {
    type Obj = Vec<(Cow<'a, str>, Json<'a>)>;

    fn view(&self) -> View<'_, Self> {
        match self {
            Json::Null => View::Null,
            Json::Bool(b) => View::Bool(*b),
            Json::Number(n) => View::Number(n),
            Json::String(s) => View::String(s),
            Json::Array(items) => View::Array(items),
            Json::Object(o) => View::Object(o),
        }
    }

    fn get<'b>(object: &'b Self::Obj, key: &str) -> Option<&'b Self> {
        object.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn members<'b>(object: &'b Self::Obj) -> impl Iterator<Item = (&'b str, &'b Self)>
    where
        Self: 'b,
    {
        object.iter().map(|(k, v)| (k.as_ref(), v))
    }

    fn is_empty(object: &Self::Obj) -> bool {
        object.is_empty()
    }
}

/// Members up to which a repeated key is looked for by scanning; larger objects use a set.
const SCAN: usize = 16;

/// Makes repeated keys behave as in `serde_json::Value`: first position, last value.
fn dedupe(members: &mut Vec<(Cow<'_, str>, Json<'_>)>) {
    let repeated = if members.len() <= SCAN {
        members.iter().enumerate().any(|(i, (k, _))| members[..i].iter().any(|(j, _)| j == k))
    } else {
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        !members.iter().all(|(k, _)| seen.insert(k.as_ref()))
    };
    if !repeated {
        return;
    }
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out: Vec<(Cow<'_, str>, Json<'_>)> = Vec::with_capacity(members.len());
    for (k, v) in members.drain(..) {
        match at.get(k.as_ref()) {
            Some(&i) => out[i].1 = v,
            None => {
                at.insert(k.to_string(), out.len());
                out.push((k, v));
            }
        }
    }
    *members = out;
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any valid JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json<'de>, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json<'de>, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json<'de>, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Json<'de>, E> {
                Ok(Number::from_f64(n).map_or(Json::Null, Json::Number))
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'de>, E> {
                Ok(Json::String(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json<'de>, E> {
                Ok(Json::String(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Json<'de>, E> {
                Ok(Json::String(Cow::Owned(s)))
            }
            fn visit_none<E>(self) -> Result<Json<'de>, E> {
                Ok(Json::Null)
            }
            fn visit_unit<E>(self) -> Result<Json<'de>, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
                Deserialize::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    members.push((key.0, map.next_value()?));
                }
                dedupe(&mut members);
                Ok(Json::Object(members))
            }
        }
        d.deserialize_any(V)
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The same document as a `Value`, to compare the two trees.
    fn to_value(j: &Json) -> Value {
        match j {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.to_string()),
            Json::Array(items) => Value::Array(items.iter().map(to_value).collect()),
            Json::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.to_string(), to_value(v))).collect()),
        }
    }

    #[test]
    fn same_tree_as_serde_json_value() {
        let many: String =
            format!("{{{}}}", (0..40).map(|i| format!("\"k{}\": {i}", i % 30)).collect::<Vec<_>>().join(", "));
        for text in [
            r#"{"resourceType":"Patient","id":"p","name":[{"family":"O\"Neil","given":["Zo\u00eb"]}],"x":1.5e3,"n":-3,"b":true,"z":null}"#,
            r#"{"a":1,"b":2,"a":3}"#,
            r#"[1, 18446744073709551615, -9223372036854775808, 0.1, "\ud83d\ude00", [], {}]"#,
            many.as_str(),
            " \"text\" ",
        ] {
            let j = Json::parse(text).unwrap();
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(to_value(&j), v, "{text}");
            // Member order too (Value keeps it with preserve_order).
            assert_eq!(serde_json::to_string(&to_value(&j)).unwrap(), serde_json::to_string(&v).unwrap());
        }
        for bad in ["{", "{\"a\" 1}", "[1,]", "", "{} x"] {
            assert!(Json::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let j = Json::parse(r#"{"id":"p1","note":"a\nb"}"#).unwrap();
        let Json::Object(m) = &j else { panic!("an object") };
        assert!(matches!(m[0].0, Cow::Borrowed("id")));
        assert!(matches!(m[0].1, Json::String(Cow::Borrowed("p1"))));
        assert_eq!(j.get("note").and_then(Json::as_str), Some("a\nb"));
    }
}
