//! FHIR `date`, `dateTime` and `instant` values as the time range their precision covers: both
//! the index (a birth date of `1980` spans that year) and the query (`birthdate=1980-02`) use it.

use time::{Date, Month, UtcOffset};

/// Inclusive bounds in microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub lo: i64,
    pub hi: i64,
}

/// An open end of a Period.
pub const MIN: i64 = i64::MIN;
pub const MAX: i64 = i64::MAX;

const US_PER_DAY: i64 = 86_400_000_000;

fn digits(s: &str, n: usize) -> Option<i32> {
    let part = s.get(..n)?;
    if part.len() == n && part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

fn day_start(y: i32, m: u8, d: u8) -> Option<i64> {
    let date = Date::from_calendar_date(y, Month::try_from(m).ok()?, d).ok()?;
    Some(date.midnight().assume_utc().unix_timestamp() * 1_000_000)
}

/// `1980`, `1980-02`, `1980-02-03`, `1980-02-03T10:20`, `1980-02-03T10:20:30.5+01:00`, … → the
/// range it denotes. A time without a zone is taken as UTC. `None` when it is not such a value.
pub fn parse(s: &str) -> Option<Range> {
    let s = s.trim();
    let y = digits(s, 4)?;
    if s.len() == 4 {
        let lo = day_start(y, 1, 1)?;
        return Some(Range { lo, hi: day_start(y, 12, 31)? + US_PER_DAY - 1 });
    }
    if s.as_bytes().get(4) != Some(&b'-') {
        return None;
    }
    let m = u8::try_from(digits(&s[5..], 2)?).ok()?;
    if s.len() == 7 {
        let last = Month::try_from(m).ok()?.length(y);
        return Some(Range { lo: day_start(y, m, 1)?, hi: day_start(y, m, last)? + US_PER_DAY - 1 });
    }
    if s.as_bytes().get(7) != Some(&b'-') {
        return None;
    }
    let d = u8::try_from(digits(&s[8..], 2)?).ok()?;
    let day = day_start(y, m, d)?;
    if s.len() == 10 {
        return Some(Range { lo: day, hi: day + US_PER_DAY - 1 });
    }
    if s.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    let rest = &s[11..];
    let hh = i64::from(digits(rest, 2)?);
    if rest.as_bytes().get(2) != Some(&b':') {
        return None;
    }
    let mm = i64::from(digits(&rest[3..], 2)?);
    let mut pos = 5;
    let mut lo = day + (hh * 3600 + mm * 60) * 1_000_000;
    let mut width = 60_000_000;
    if rest.as_bytes().get(pos) == Some(&b':') {
        let ss = i64::from(digits(&rest[pos + 1..], 2)?);
        if ss > 60 {
            return None;
        }
        lo += ss * 1_000_000;
        width = 1_000_000;
        pos += 3;
        if rest.as_bytes().get(pos) == Some(&b'.') {
            let frac: String = rest[pos + 1..].chars().take_while(char::is_ascii_digit).collect();
            if frac.is_empty() {
                return None;
            }
            pos += 1 + frac.len();
            let kept = &frac[..frac.len().min(6)];
            lo += kept.parse::<i64>().ok()? * 10i64.pow(6 - kept.len() as u32);
            width = 10i64.pow(6 - kept.len() as u32);
        }
    }
    if hh > 23 || mm > 59 {
        return None;
    }
    let offset_us = match &rest[pos..] {
        "" | "Z" => 0,
        zone => {
            let sign = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = (digits(&zone[1..], 2)?, digits(zone.get(4..)?, 2)?);
            if zone.len() != 6 || zone.as_bytes()[3] != b':' {
                return None;
            }
            let off = UtcOffset::from_hms(i8::try_from(oh).ok()?, i8::try_from(om).ok()?, 0).ok()?;
            sign * i64::from(off.whole_seconds()) * 1_000_000
        }
    };
    let lo = lo - offset_us;
    Some(Range { lo, hi: lo + width - 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> (String, String) {
        let range = parse(s).unwrap_or(Range { lo: 0, hi: 0 });
        (crate::resources::instant(range.lo), crate::resources::instant(range.hi))
    }

    #[test]
    fn precision_decides_the_range() {
        assert_eq!(r("1980"), ("1980-01-01T00:00:00.000000Z".into(), "1980-12-31T23:59:59.999999Z".into()));
        assert_eq!(r("2024-02"), ("2024-02-01T00:00:00.000000Z".into(), "2024-02-29T23:59:59.999999Z".into()));
        assert_eq!(r("2023-02-28"), ("2023-02-28T00:00:00.000000Z".into(), "2023-02-28T23:59:59.999999Z".into()));
        assert_eq!(r("2023-02-28T10:20"), ("2023-02-28T10:20:00.000000Z".into(), "2023-02-28T10:20:59.999999Z".into()));
        assert_eq!(
            r("2023-02-28T10:20:30+02:00"),
            ("2023-02-28T08:20:30.000000Z".into(), "2023-02-28T08:20:30.999999Z".into())
        );
        assert_eq!(
            r("2023-02-28T10:20:30.25Z"),
            ("2023-02-28T10:20:30.250000Z".into(), "2023-02-28T10:20:30.259999Z".into())
        );
        assert_eq!(
            r("2023-12-31T23:30:00-01:00"),
            ("2024-01-01T00:30:00.000000Z".into(), "2024-01-01T00:30:00.999999Z".into())
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "80",
            "1980-13",
            "1980-02-30",
            "1980-2-3",
            "1980-02-03T",
            "1980-02-03T25:00",
            "1980-02-03T10:20:30+2",
            "1980-02-03T10:20:30.Z",
            "1980/02/03",
            "abcd",
            "1980-02-03T10:20:30X",
            "２０２０",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
