//! [`Json`]: a JSON document parsed into one flat array of nodes (a tape) that borrows its strings
//! from the text.
//!
//! `payerx load` and the validate processor check resources they keep as text. A tree of nested
//! `Vec`s (or a `serde_json::Value`) costs an allocation per object and array and most of the
//! parse time; the tape is one allocation, and a resource of a few KB parses in about the time
//! serde_json takes to skip over it.
//!
//! Layout: a scalar is one node; an array is a node followed by its items; an object is a node
//! followed by key, value, key, value... Every container node records where it ends, so a
//! reader skips a whole subtree in one step. Strings with escapes are decoded (by serde_json, so
//! the rules are the same) into a side buffer.
//!
//! The parser accepts exactly RFC 8259 JSON, as serde_json does; where serde_json would take a
//! document the tape refuses (nesting deeper than serde_json's limit is the only known case),
//! callers fall back to `serde_json::Value`.

use std::fmt;
use std::str::FromStr;

use serde_json::Number;

use super::tree::{Num, View};

/// Containers nested deeper than this are refused (serde_json refuses at 128).
const MAX_NESTING: usize = 127;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Null,
    False,
    True,
    /// `a`..`a + b` of the text.
    Num,
    /// `a`..`a + b` of the text (between the quotes; no escapes).
    Str,
    /// `a`..`a + b` of the decoded-string buffer.
    Esc,
    /// `a` items; `b` is the index of the node after the array.
    Arr,
    /// `a` members; `b` is the index of the node after the object.
    Obj,
    /// An object in which some key appears more than once.
    ObjDup,
}

#[derive(Clone, Copy, Debug)]
struct Cell {
    tag: Tag,
    a: u32,
    b: u32,
}

/// A parsed JSON document. Repeated keys read as in `serde_json::Value`: the first position, the
/// last value.
pub struct Json<'a> {
    text: &'a str,
    nodes: Vec<Cell>,
    decoded: String,
}

/// Why the tape refused a document (callers ask serde_json for the wording).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    /// Byte offset where parsing stopped.
    pub at: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not valid JSON (at byte {})", self.at)
    }
}

impl std::error::Error for ParseError {}

/// A node of a [`Json`] document.
#[derive(Clone, Copy)]
pub struct Node<'d, 'a> {
    doc: &'d Json<'a>,
    at: u32,
}

#[derive(Clone, Copy)]
pub struct Array<'d, 'a> {
    doc: &'d Json<'a>,
    at: u32,
}

#[derive(Clone, Copy)]
pub struct Object<'d, 'a> {
    doc: &'d Json<'a>,
    at: u32,
}

impl<'a> Json<'a> {
    /// Parses `text` (one JSON document; surrounding whitespace allowed).
    pub fn parse(text: &'a str) -> Result<Json<'a>, ParseError> {
        if text.len() >= u32::MAX as usize {
            return Err(ParseError { at: 0 });
        }
        let mut p = Parser {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            // About one node per 12 bytes of a FHIR resource: one allocation in the usual case.
            nodes: Vec::with_capacity(text.len() / 8 + 4),
            decoded: String::new(),
            keys: Vec::new(),
            depth: 0,
        };
        p.ws();
        p.value()?;
        p.ws();
        if p.pos != p.bytes.len() {
            return Err(ParseError { at: p.pos });
        }
        Ok(Json { text, nodes: p.nodes, decoded: p.decoded })
    }

    /// The document's root value.
    pub fn root(&self) -> Node<'_, 'a> {
        Node { doc: self, at: 0 }
    }

    /// The member `key` of the root object.
    pub fn get(&self, key: &str) -> Option<Node<'_, 'a>> {
        match self.root().view() {
            View::Object(o) => o.get(key),
            _ => None,
        }
    }

    /// The string member `key` of the root object.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|n| n.as_str())
    }

    fn cell(&self, at: u32) -> Cell {
        self.nodes[at as usize]
    }

    /// The index of the node after the subtree at `at`.
    fn next(&self, at: u32) -> u32 {
        let n = self.cell(at);
        match n.tag {
            Tag::Arr | Tag::Obj | Tag::ObjDup => n.b,
            _ => at + 1,
        }
    }

    fn text_of(&self, n: Cell) -> &str {
        match n.tag {
            Tag::Esc => &self.decoded[n.a as usize..(n.a + n.b) as usize],
            _ => &self.text[n.a as usize..(n.a + n.b) as usize],
        }
    }
}

impl<'d, 'a: 'd> Node<'d, 'a> {
    /// What the node holds, as the validator sees any JSON tree.
    pub(crate) fn view(self) -> View<'d, Self> {
        let n = self.doc.cell(self.at);
        match n.tag {
            Tag::Null => View::Null,
            Tag::False => View::Bool(false),
            Tag::True => View::Bool(true),
            Tag::Num => View::Number(Num::Text(&self.doc.text[n.a as usize..(n.a + n.b) as usize])),
            Tag::Str | Tag::Esc => View::String(self.doc.text_of(n)),
            Tag::Arr => View::Array(Array { doc: self.doc, at: self.at }),
            Tag::Obj | Tag::ObjDup => View::Object(Object { doc: self.doc, at: self.at }),
        }
    }

    pub fn as_str(self) -> Option<&'d str> {
        match self.view() {
            View::String(s) => Some(s),
            _ => None,
        }
    }
}

impl<'d, 'a> Array<'d, 'a> {
    pub fn len(self) -> usize {
        self.doc.cell(self.at).a as usize
    }

    pub fn iter(self) -> impl Iterator<Item = Node<'d, 'a>> {
        let doc = self.doc;
        let mut at = self.at + 1;
        (0..self.len()).map(move |_| {
            let item = Node { doc, at };
            at = doc.next(at);
            item
        })
    }
}

impl<'d, 'a> Object<'d, 'a> {
    pub fn len(self) -> usize {
        self.doc.cell(self.at).a as usize
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Every member as written, repeats included.
    fn raw(self) -> Members<'d, 'a> {
        Members { doc: self.doc, at: self.at + 1, left: self.len(), deduplicated: None }
    }

    fn has_repeats(self) -> bool {
        self.doc.cell(self.at).tag == Tag::ObjDup
    }

    /// The members in document order; a repeated key once, at its first position, with its last
    /// value.
    pub fn members(self) -> Members<'d, 'a> {
        if !self.has_repeats() {
            return self.raw();
        }
        // Rare (the parse flags such objects), and done in one pass with a map: scanning for
        // each member's first and last occurrence would be quadratic in a hostile object.
        let mut at: std::collections::HashMap<&'d str, usize> = std::collections::HashMap::new();
        let mut once: Vec<(&'d str, Node<'d, 'a>)> = Vec::new();
        for (key, value) in self.raw() {
            match at.get(key) {
                Some(&i) => once[i].1 = value,
                None => {
                    at.insert(key, once.len());
                    once.push((key, value));
                }
            }
        }
        Members { deduplicated: Some(once.into_iter()), ..self.raw() }
    }

    pub fn get(self, key: &str) -> Option<Node<'d, 'a>> {
        let mut found = self.raw().filter(|(k, _)| *k == key).map(|(_, v)| v);
        if self.has_repeats() {
            found.last()
        } else {
            found.next()
        }
    }
}

/// The members of an object (the walker's inner loop, so a plain struct rather than adapters).
pub struct Members<'d, 'a> {
    doc: &'d Json<'a>,
    at: u32,
    left: usize,
    /// For an object that repeats a key: each key once, at its first position, with its last
    /// value.
    deduplicated: Option<std::vec::IntoIter<(&'d str, Node<'d, 'a>)>>,
}

impl<'d, 'a> Iterator for Members<'d, 'a> {
    type Item = (&'d str, Node<'d, 'a>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if let Some(once) = &mut self.deduplicated {
            return once.next();
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let key = self.doc.text_of(self.doc.cell(self.at));
        let value = Node { doc: self.doc, at: self.at + 1 };
        self.at = self.doc.next(self.at + 1);
        Some((key, value))
    }
}

/// The number as serde_json reads it (for range checks and messages).
pub fn number(text: &str) -> Option<Number> {
    Number::from_str(text).ok()
}

struct Parser<'t> {
    text: &'t str,
    bytes: &'t [u8],
    pos: usize,
    nodes: Vec<Cell>,
    decoded: String,
    /// The keys of the objects being parsed: (hash, node index); each object's keys from the
    /// length this had when the object opened.
    keys: Vec<(u32, u32)>,
    depth: usize,
}

impl Parser<'_> {
    fn fail<T>(&self) -> Result<T, ParseError> {
        Err(ParseError { at: self.pos })
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn push(&mut self, tag: Tag, a: usize, b: usize) {
        self.nodes.push(Cell { tag, a: a as u32, b: b as u32 });
    }

    fn value(&mut self) -> Result<(), ParseError> {
        match self.bytes.get(self.pos) {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string(),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true", Tag::True),
            Some(b'f') => self.literal(b"false", Tag::False),
            Some(b'n') => self.literal(b"null", Tag::Null),
            _ => self.fail(),
        }
    }

    fn literal(&mut self, word: &[u8], tag: Tag) -> Result<(), ParseError> {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            self.push(tag, 0, 0);
            Ok(())
        } else {
            self.fail()
        }
    }

    fn enter(&mut self) -> Result<usize, ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return self.fail();
        }
        self.pos += 1;
        let at = self.nodes.len();
        self.push(Tag::Null, 0, 0); // patched when the container closes
        self.ws();
        Ok(at)
    }

    fn close(&mut self, at: usize, tag: Tag, len: usize) {
        self.pos += 1;
        self.depth -= 1;
        let end = self.nodes.len();
        self.nodes[at] = Cell { tag, a: len as u32, b: end as u32 };
    }

    /// After an item: `true` past a comma (another item follows), `false` on `close`.
    fn more(&mut self, close: u8) -> Result<bool, ParseError> {
        self.ws();
        match self.bytes.get(self.pos) {
            Some(b',') => {
                self.pos += 1;
                self.ws();
                Ok(true)
            }
            Some(&b) if b == close => Ok(false),
            _ => self.fail(),
        }
    }

    fn array(&mut self) -> Result<(), ParseError> {
        let at = self.enter()?;
        let mut len = 0;
        if self.bytes.get(self.pos) != Some(&b']') {
            loop {
                self.value()?;
                len += 1;
                if !self.more(b']')? {
                    break;
                }
            }
        }
        self.close(at, Tag::Arr, len);
        Ok(())
    }

    fn object(&mut self) -> Result<(), ParseError> {
        let at = self.enter()?;
        let first_key = self.keys.len();
        let mut len = 0;
        if self.bytes.get(self.pos) != Some(&b'}') {
            loop {
                if self.bytes.get(self.pos) != Some(&b'"') {
                    return self.fail();
                }
                let key_at = self.nodes.len() as u32;
                let hash = self.key()?;
                self.keys.push((hash, key_at));
                self.ws();
                if self.bytes.get(self.pos) != Some(&b':') {
                    return self.fail();
                }
                self.pos += 1;
                self.ws();
                self.value()?;
                len += 1;
                if !self.more(b'}')? {
                    break;
                }
            }
        }
        let tag = if self.repeats(first_key) { Tag::ObjDup } else { Tag::Obj };
        self.keys.truncate(first_key);
        self.close(at, tag, len);
        Ok(())
    }

    /// Whether the object whose keys start at `first_key` has a key twice. Compares hashes
    /// pairwise for the usual small object, sorts them for a large one (so a hostile object of
    /// many keys costs n log n), and confirms a hash match on the text.
    fn repeats(&self, first_key: usize) -> bool {
        let keys = &self.keys[first_key..];
        let text = |i: u32| {
            let n = self.nodes[i as usize];
            match n.tag {
                Tag::Esc => &self.decoded.as_bytes()[n.a as usize..(n.a + n.b) as usize],
                _ => &self.bytes[n.a as usize..(n.a + n.b) as usize],
            }
        };
        if keys.len() <= 16 {
            return keys
                .iter()
                .enumerate()
                .any(|(i, (h, k))| keys[..i].iter().any(|(h2, k2)| h == h2 && text(*k) == text(*k2)));
        }
        let mut hashes: Vec<u32> = keys.iter().map(|(h, _)| *h).collect();
        hashes.sort_unstable();
        if hashes.windows(2).all(|w| w[0] != w[1]) {
            return false;
        }
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        !keys.iter().all(|(_, k)| seen.insert(text(*k)))
    }

    /// A string at `pos` (on its opening quote).
    fn string(&mut self) -> Result<(), ParseError> {
        let start = self.pos + 1;
        let i = special(self.bytes, start);
        match self.bytes.get(i) {
            Some(b'"') => {
                self.push(Tag::Str, start, i - start);
                self.pos = i + 1;
                Ok(())
            }
            Some(b'\\') => self.escaped(start, i),
            _ => {
                self.pos = i;
                self.fail()
            }
        }
    }

    /// The rest of a string that has an escape at `i`, decoded into the side buffer (the escapes
    /// of RFC 8259; a `\u` surrogate must be half of a pair, as serde_json requires).
    fn escaped(&mut self, start: usize, mut i: usize) -> Result<(), ParseError> {
        let from = self.decoded.len();
        let (bytes, text) = (self.bytes, self.text);
        // Runs end at ASCII bytes, so they are whole characters of the `str`.
        let run = |a: usize, b: usize| text.get(a..b).ok_or(ParseError { at: a });
        self.decoded.push_str(run(start, i)?);
        loop {
            let j = special(bytes, i);
            self.decoded.push_str(run(i, j)?);
            i = j;
            match bytes.get(i) {
                Some(b'"') => break,
                Some(b'\\') => {}
                _ => return Err(ParseError { at: i }),
            }
            let letter = bytes.get(i + 1).copied().unwrap_or(0);
            if letter == b'u' {
                let hi = hex4(bytes, i + 2).ok_or(ParseError { at: i })?;
                i += 6;
                let c = if (0xD800..=0xDBFF).contains(&hi) {
                    if bytes.get(i) != Some(&b'\\') || bytes.get(i + 1) != Some(&b'u') {
                        return Err(ParseError { at: i });
                    }
                    let lo = hex4(bytes, i + 2).ok_or(ParseError { at: i })?;
                    i += 6;
                    surrogate_pair(hi, lo)
                } else {
                    char::from_u32(hi) // `None` for a lone low surrogate
                };
                self.decoded.push(c.ok_or(ParseError { at: i })?);
                continue;
            }
            let c = short_escape(letter).ok_or(ParseError { at: i })?;
            self.decoded.push(c);
            i += 2;
        }
        self.push(Tag::Esc, from, self.decoded.len() - from);
        self.pos = i + 1;
        Ok(())
    }

    /// A key: a string, plus a cheap hash of its decoded text for the repeated-key check.
    fn key(&mut self) -> Result<u32, ParseError> {
        self.string()?;
        let cell = self.nodes[self.nodes.len() - 1];
        let text = match cell.tag {
            Tag::Esc => &self.decoded.as_bytes()[cell.a as usize..(cell.a + cell.b) as usize],
            _ => &self.bytes[cell.a as usize..(cell.a + cell.b) as usize],
        };
        let (first, last) = (text.first().copied().unwrap_or(0), text.last().copied().unwrap_or(0));
        let middle = text.get(text.len() / 2).copied().unwrap_or(0);
        Ok(u32::from_le_bytes([text.len() as u8, first, middle, last]))
    }

    fn digits(&mut self) -> usize {
        let from = self.pos;
        while let Some(b'0'..=b'9') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
        self.pos - from
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, and in f64 range (as serde_json wants).
    fn number(&mut self) -> Result<(), ParseError> {
        let start = self.pos;
        if self.bytes.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        match self.bytes.get(self.pos) {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.bytes.get(self.pos) {
                    return self.fail();
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return self.fail(),
        }
        let mut plain = true;
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            plain = false;
            if self.digits() == 0 {
                return self.fail();
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            self.pos += 1;
            plain = false;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return self.fail();
            }
        }
        let text = &self.bytes[start..self.pos];
        // Beyond 19 digits an integer is read as a float, and a float may overflow: serde_json
        // refuses those, so the tape does too.
        if !plain || text.len() > 19 {
            let finite = std::str::from_utf8(text).ok().and_then(|t| t.parse::<f64>().ok()).is_some_and(f64::is_finite);
            if !finite {
                return self.fail();
            }
        }
        self.push(Tag::Num, start, self.pos - start);
        Ok(())
    }
}

/// The index of the first `"`, `\\` or control character at or after `from` (or the length):
/// eight bytes at a time, as string content is most of a FHIR resource.
fn special(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is flagged when it is zero; only the lowest flag is exact, which is the one
    // used.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let hits = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGH);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&b) = bytes.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// The character a one-letter JSON escape stands for (`n` in `\\n`, ...); `None` for `u` and for
/// what is not an escape.
pub fn short_escape(letter: u8) -> Option<char> {
    Some(match letter {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        _ => return None,
    })
}

/// The character a `\\uD8xx\\uDCxx` surrogate pair stands for, when `hi` and `lo` are one.
pub fn surrogate_pair(hi: u32, lo: u32) -> Option<char> {
    if !(0xD800..=0xDBFF).contains(&hi) || !(0xDC00..=0xDFFF).contains(&lo) {
        return None;
    }
    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
}

fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at + 4)?;
    digits.iter().try_fold(0u32, |n, &b| Some(n * 16 + char::from(b).to_digit(16)?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The same document as a `serde_json::Value`, to compare with serde_json's own parse.
    fn to_value(n: Node) -> serde_json::Value {
        match n.view() {
            View::Null => serde_json::Value::Null,
            View::Bool(b) => serde_json::Value::Bool(b),
            View::Number(Num::Text(t)) => serde_json::Value::Number(number(t).unwrap()),
            View::Number(Num::Parsed(n)) => serde_json::Value::Number(n.clone()),
            View::String(s) => serde_json::Value::String(s.to_string()),
            View::Array(a) => serde_json::Value::Array(a.iter().map(to_value).collect()),
            View::Object(o) => {
                serde_json::Value::Object(o.members().map(|(k, v)| (k.to_string(), to_value(v))).collect())
            }
        }
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn same_document_as_serde_json() {
        let many: String =
            format!("{{{}}}", (0..40).map(|i| format!("\"k{}\": {i}", i % 30)).collect::<Vec<_>>().join(", "));
        let distinct: String =
            format!("{{{}}}", (0..40).map(|i| format!("\"k{i}\": {i}")).collect::<Vec<_>>().join(", "));
        for text in [
            r#"{"resourceType":"Patient","id":"p","name":[{"family":"O\"Neil","given":["Zo\u00eb"]}],"x":1.5e3,"n":-3,"b":true,"z":null}"#,
            r#"{"a":1,"b":2,"a":3}"#,
            r#"{"a":1,"\u0061":2}"#,
            r#"[1, 18446744073709551615, 18446744073709551616, -9223372036854775808, -9223372036854775809, 0.1, -0, 1E+2, "\ud83d\ude00", [], {}]"#,
            r#"{"a":{"b":[{"c":[]},{"c":{}}],"d":"\t"},"e":[[[null]]]}"#,
            many.as_str(),
            distinct.as_str(),
            " \"text\" ",
            r#"["\"\\\/\b\f\n\r\t", "a\u0000b", "\u00e9t\u00E9", "\ud83d\ude00x", "x\uFFFF", "café \n😀"]"#,
            "\t\r\n 7 ",
            &nested(MAX_NESTING),
        ] {
            let doc = Json::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let mine = to_value(doc.root());
            assert_eq!(mine, v, "{text}");
            // Member order too (Value keeps it with preserve_order).
            assert_eq!(serde_json::to_string(&mine).unwrap(), serde_json::to_string(&v).unwrap());
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        for bad in [
            "",
            " ",
            "{",
            "}",
            "[",
            "[1,]",
            "[,1]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{a:1}",
            "{} x",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "1e+",
            "+1",
            "tru",
            "nul",
            "\"abc",
            "\"a\u{1}b\"",
            "\"\\x\"",
            "\"\\ud800\"",
            "1e400",
            r#""\udc00""#,
            r#""\ud800\u0041""#,
            r#""\ud800x""#,
            r#""\u12G4""#,
            r#""\u12""#,
            r#""a\""#,
            "\"a\\\u{1}\"",
            "[1 2]",
            "{\"a\":1 \"b\":2}",
            "'a'",
            "NaN",
        ] {
            assert!(Json::parse(bad).is_err(), "tape took {bad:?}");
            assert!(serde_json::from_str::<serde_json::Value>(bad).is_err(), "serde_json took {bad:?}");
        }
        // Nesting: the tape stops one level before serde_json's own limit, never after it.
        assert!(Json::parse(&nested(MAX_NESTING + 1)).is_err());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_NESTING + 2)).is_err());
    }

    #[test]
    fn the_word_scan_finds_the_first_special_byte() {
        let naive = |b: &[u8], from: usize| {
            (from..b.len()).find(|&i| b[i] == b'"' || b[i] == b'\\' || b[i] < 0x20).unwrap_or(b.len())
        };
        // Every position of every special byte, after plain ASCII, multi-byte UTF-8 (high bits
        // set), and bytes just above the control range, with a later special byte behind it.
        for filler in ["a", "é", "😀", " ", "!", "\u{7f}"] {
            for len in 0..20 {
                for special_byte in ['"', '\\', '\u{0}', '\u{1f}', '\n'] {
                    let s = format!("{}{special_byte}x\"", filler.repeat(len));
                    for from in [0, 1] {
                        let b = s.as_bytes();
                        assert_eq!(special(b, from), naive(b, from), "{s:?} from {from}");
                    }
                }
                let plain = filler.repeat(len);
                assert_eq!(special(plain.as_bytes(), 0), plain.len());
            }
        }
    }

    #[test]
    fn repeated_keys_read_as_in_serde_json_value() {
        let doc = Json::parse(r#"{"a":1,"b":{"x":[1,2]},"a":{"y":true},"c":3}"#).unwrap();
        let View::Object(o) = doc.root().view() else { panic!("an object") };
        let keys: Vec<&str> = o.members().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert!(matches!(o.get("a").map(Node::view), Some(View::Object(_))));
        assert_eq!(o.len(), 4, "len counts members as written");
    }

    #[test]
    fn strings_without_escapes_borrow_from_the_text() {
        let text = r#"{"id":"p1","note":"a\nb"}"#;
        let doc = Json::parse(text).unwrap();
        let id = doc.str("id").unwrap();
        assert!(std::ptr::eq(id.as_ptr(), text[7..].as_ptr()), "id points into the text");
        assert_eq!(doc.str("note"), Some("a\nb"));
        assert_eq!(doc.nodes.len(), 5, "one node per key and scalar, one for the object");
    }
}
