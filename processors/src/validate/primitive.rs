//! FHIR R4 primitive types: their JSON representation and hand-written checkers for the R4
//! regular expressions (<http://hl7.org/fhir/R4/datatypes.html#primitive>), which are small
//! grammars; no regex engine needed.

/// The R4 primitive types (`xhtml` included: Narrative.div).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prim {
    Base64Binary,
    Boolean,
    Canonical,
    Code,
    Date,
    DateTime,
    Decimal,
    Id,
    Instant,
    Integer,
    Markdown,
    Oid,
    PositiveInt,
    String,
    Time,
    UnsignedInt,
    Uri,
    Url,
    Uuid,
    Xhtml,
}

/// How a primitive is written in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JsonRepr {
    Bool,
    Integer,
    Number,
    String,
}

impl Prim {
    pub(crate) fn from_code(code: &str) -> Option<Prim> {
        Some(match code {
            "base64Binary" => Prim::Base64Binary,
            "boolean" => Prim::Boolean,
            "canonical" => Prim::Canonical,
            "code" => Prim::Code,
            "date" => Prim::Date,
            "dateTime" => Prim::DateTime,
            "decimal" => Prim::Decimal,
            "id" => Prim::Id,
            "instant" => Prim::Instant,
            "integer" => Prim::Integer,
            "markdown" => Prim::Markdown,
            "oid" => Prim::Oid,
            "positiveInt" => Prim::PositiveInt,
            "string" => Prim::String,
            "time" => Prim::Time,
            "unsignedInt" => Prim::UnsignedInt,
            "uri" => Prim::Uri,
            "url" => Prim::Url,
            "uuid" => Prim::Uuid,
            "xhtml" => Prim::Xhtml,
            _ => return None,
        })
    }

    pub(crate) fn code(self) -> &'static str {
        match self {
            Prim::Base64Binary => "base64Binary",
            Prim::Boolean => "boolean",
            Prim::Canonical => "canonical",
            Prim::Code => "code",
            Prim::Date => "date",
            Prim::DateTime => "dateTime",
            Prim::Decimal => "decimal",
            Prim::Id => "id",
            Prim::Instant => "instant",
            Prim::Integer => "integer",
            Prim::Markdown => "markdown",
            Prim::Oid => "oid",
            Prim::PositiveInt => "positiveInt",
            Prim::String => "string",
            Prim::Time => "time",
            Prim::UnsignedInt => "unsignedInt",
            Prim::Uri => "uri",
            Prim::Url => "url",
            Prim::Uuid => "uuid",
            Prim::Xhtml => "xhtml",
        }
    }

    pub(crate) fn repr(self) -> JsonRepr {
        match self {
            Prim::Boolean => JsonRepr::Bool,
            Prim::Integer | Prim::PositiveInt | Prim::UnsignedInt => JsonRepr::Integer,
            Prim::Decimal => JsonRepr::Number,
            _ => JsonRepr::String,
        }
    }

    /// The inclusive range of an integer type.
    pub(crate) fn int_range(self) -> (i64, i64) {
        match self {
            Prim::PositiveInt => (1, i64::from(i32::MAX)),
            Prim::UnsignedInt => (0, i64::from(i32::MAX)),
            _ => (i64::from(i32::MIN), i64::from(i32::MAX)),
        }
    }

    /// Checks a (non-empty) string value against the type's grammar.
    pub(crate) fn check_str(self, s: &str) -> bool {
        match self {
            Prim::Date => is_date(s),
            Prim::DateTime => is_date_time(s),
            Prim::Instant => is_instant(s),
            Prim::Time => is_time(s),
            Prim::Id => is_valid_id(s),
            Prim::Code => is_code(s),
            Prim::Oid => is_oid(s),
            Prim::Uuid => is_uuid(s),
            Prim::Base64Binary => is_base64(s),
            Prim::Uri | Prim::Url | Prim::Canonical => !s.bytes().any(is_space),
            Prim::Xhtml => s.trim_start().starts_with("<div"),
            _ => true,
        }
    }

    /// What a valid value looks like, for diagnostics.
    pub(crate) fn hint(self) -> &'static str {
        match self {
            Prim::Date => "YYYY, YYYY-MM or YYYY-MM-DD",
            Prim::DateTime => "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.sss] with a time zone (Z or +hh:mm)",
            Prim::Instant => "YYYY-MM-DDThh:mm:ss[.sss] with a time zone (Z or +hh:mm)",
            Prim::Time => "hh:mm:ss[.sss], no time zone",
            Prim::Id => "1 to 64 characters from A-Z, a-z, 0-9, '-' and '.'",
            Prim::Code => "no leading, trailing or repeated whitespace",
            Prim::Oid => "urn:oid: followed by a dotted OID such as 2.16.840.1.113883",
            Prim::Uuid => "urn:uuid: followed by a lowercase UUID",
            Prim::Base64Binary => "base64: A-Z, a-z, 0-9, '+', '/' in groups of 4, '=' padding at the end",
            Prim::Uri | Prim::Url | Prim::Canonical => "no whitespace",
            Prim::Xhtml => "an XHTML <div> element",
            _ => "",
        }
    }
}

/// `\s` of the spec's regexes (Java): ASCII whitespace.
#[inline]
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// `[A-Za-z0-9\-\.]{1,64}`
pub fn is_valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `[^\s]+(\s[^\s]+)*`
fn is_code(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) if !is_space(f) && !is_space(l) => !b.windows(2).any(|w| is_space(w[0]) && is_space(w[1])),
        _ => false,
    }
}

/// `urn:oid:[0-2](\.(0|[1-9][0-9]*))+`
fn is_oid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut arcs = rest.split('.');
    if !matches!(arcs.next(), Some("0" | "1" | "2")) {
        return false;
    }
    let mut n = 0;
    for arc in arcs {
        let b = arc.as_bytes();
        let ok = match b {
            [b'0'] => true,
            [first, rest @ ..] => (b'1'..=b'9').contains(first) && rest.iter().all(u8::is_ascii_digit),
            [] => false,
        };
        if !ok {
            return false;
        }
        n += 1;
    }
    n > 0
}

/// `urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`
fn is_uuid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:uuid:") else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// `(\s*([0-9a-zA-Z\+/=]){4}\s*)+`, with `=` only as padding at the end.
fn is_base64(s: &str) -> bool {
    let mut n = 0usize;
    let mut pad = 0usize;
    for b in s.bytes() {
        if is_space(b) {
            continue;
        }
        if b == b'=' {
            pad += 1;
            if pad > 2 {
                return false;
            }
        } else if pad > 0 || !(b.is_ascii_alphanumeric() || b == b'+' || b == b'/') {
            return false;
        }
        n += 1;
    }
    n > 0 && n % 4 == 0
}

/// A cursor over ASCII digits and separators.
struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cur<'_> {
    fn digits(&mut self, n: usize) -> Option<u32> {
        let d = self.b.get(self.i..self.i + n)?;
        let mut v = 0u32;
        for &c in d {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        self.i += n;
        Some(v)
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn done(&self) -> bool {
        self.i == self.b.len()
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `YYYY[-MM[-DD]]` with a real calendar date; returns how many parts were present (1 to 3).
fn date_parts(c: &mut Cur) -> Option<u8> {
    let year = c.digits(4)?;
    if year == 0 {
        return None;
    }
    if !c.eat(b'-') {
        return Some(1);
    }
    let month = c.digits(2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if !c.eat(b'-') {
        return Some(2);
    }
    let day = c.digits(2)?;
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    Some(3)
}

/// `hh:mm:ss[.s+]`
fn time_part(c: &mut Cur) -> Option<()> {
    let h = c.digits(2)?;
    if h > 23 || !c.eat(b':') {
        return None;
    }
    let m = c.digits(2)?;
    if m > 59 || !c.eat(b':') {
        return None;
    }
    let s = c.digits(2)?;
    if s > 60 {
        return None;
    }
    if c.eat(b'.') {
        let start = c.i;
        while c.b.get(c.i).is_some_and(u8::is_ascii_digit) {
            c.i += 1;
        }
        if c.i == start {
            return None;
        }
    }
    Some(())
}

/// `Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)`
fn zone(c: &mut Cur) -> Option<()> {
    if c.eat(b'Z') {
        return Some(());
    }
    if !(c.eat(b'+') || c.eat(b'-')) {
        return None;
    }
    let h = c.digits(2)?;
    if !c.eat(b':') {
        return None;
    }
    let m = c.digits(2)?;
    (h <= 13 && m <= 59 || h == 14 && m == 0).then_some(())
}

fn is_date(s: &str) -> bool {
    let mut c = Cur { b: s.as_bytes(), i: 0 };
    date_parts(&mut c).is_some() && c.done()
}

fn is_date_time(s: &str) -> bool {
    let mut c = Cur { b: s.as_bytes(), i: 0 };
    match date_parts(&mut c) {
        Some(3) if c.eat(b'T') => time_part(&mut c).and_then(|_| zone(&mut c)).is_some() && c.done(),
        Some(_) => c.done(),
        None => false,
    }
}

fn is_instant(s: &str) -> bool {
    let mut c = Cur { b: s.as_bytes(), i: 0 };
    date_parts(&mut c) == Some(3) && c.eat(b'T') && time_part(&mut c).and_then(|_| zone(&mut c)).is_some() && c.done()
}

fn is_time(s: &str) -> bool {
    let mut c = Cur { b: s.as_bytes(), i: 0 };
    time_part(&mut c).is_some() && c.done()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for ok in ["2024", "2024-02", "2024-02-29", "2000-02-29", "0001-01-01", "1980-12-31"] {
            assert!(is_date(ok), "{ok}");
        }
        for bad in [
            "",
            "24",
            "0000",
            "2023-02-29",
            "1900-02-29",
            "1980-13-45",
            "1980-1-01",
            "1980-04-31",
            "2024-01-01T10:00:00Z",
            "2024/01/01",
        ] {
            assert!(!is_date(bad), "{bad}");
        }
    }

    #[test]
    fn date_times_and_instants() {
        for ok in [
            "2024",
            "2024-05",
            "2024-05-06",
            "2024-05-06T10:11:12Z",
            "2024-05-06T10:11:12.123456+05:30",
            "2017-06-01T00:00:00-04:00",
            "2024-05-06T23:59:60+14:00",
        ] {
            assert!(is_date_time(ok), "{ok}");
        }
        for bad in [
            "2024-05-06T10:11:12",
            "2024-05-06T10:11Z",
            "2024-05T10:11:12Z",
            "2024-05-06T24:00:00Z",
            "2024-05-06T10:11:12+14:30",
            "2024-05-06T10:11:12.Z",
            "2024-05-06 10:11:12Z",
        ] {
            assert!(!is_date_time(bad), "{bad}");
        }
        assert!(is_instant("2021-08-10T13:49:59.380916Z"));
        assert!(!is_instant("2021-08-10"));
        assert!(!is_instant("2021-08-10T13:49:59"));
        assert!(is_time("13:49:59.5") && is_time("00:00:00"));
        assert!(!is_time("13:49") && !is_time("25:00:00") && !is_time("10:00:00Z"));
    }

    #[test]
    fn tokens() {
        assert!(is_valid_id("a-Z.0") && is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id("") && !is_valid_id(&"x".repeat(65)) && !is_valid_id("a_b") && !is_valid_id("a b"));
        assert!(is_code("active") && is_code("a b") && is_code("ünïcode"));
        assert!(!is_code(" a") && !is_code("a ") && !is_code("a  b") && !is_code(""));
        assert!(
            is_oid("urn:oid:2.16.840.1.113883")
                && !is_oid("urn:oid:3.1")
                && !is_oid("urn:oid:1")
                && !is_oid("urn:oid:1.02")
                && !is_oid("2.16")
        );
        assert!(is_uuid("urn:uuid:c757873d-ec9a-4326-a141-556f43239520"));
        assert!(
            !is_uuid("urn:uuid:C757873D-EC9A-4326-A141-556F43239520")
                && !is_uuid("c757873d-ec9a-4326-a141-556f43239520")
        );
        assert!(is_base64("SGVsbG8=") && is_base64("SGVs bG8h\nSGk=") && is_base64("ab+/"));
        assert!(
            !is_base64("SGVsbG8")
                && !is_base64("SGV=bG8=")
                && !is_base64("SGVsbG8*")
                && !is_base64("")
                && !is_base64("a===")
        );
    }
}
