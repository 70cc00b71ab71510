//! Parses the ISO 8601 date-times the original service accepted (Django's `parse_datetime`).
//!
//! `YYYY-MM-DD[T| ]hh:mm[:ss[.fraction]][Z|±hh[:mm]|±hhmm]`; a naive value means UTC.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

/// The message the original answered with for a date-time it could not read.
pub const WRONG_FORMAT: &str = "Datetime has wrong format. Use one of these formats instead: \
                                YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z].";

/// Reads `text` as an ISO 8601 date-time; `None` when it is not one.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    let mut p = Cursor {
        s: text.trim().as_bytes(),
        i: 0,
    };
    let year = p.digits(4, 4)?;
    p.expect(b'-')?;
    let month = p.digits(1, 2)?;
    p.expect(b'-')?;
    let day = p.digits(1, 2)?;
    if !(p.eat(b'T') || p.eat(b't') || p.eat(b' ')) {
        return None;
    }
    let hour = p.digits(1, 2)?;
    p.expect(b':')?;
    let minute = p.digits(1, 2)?;
    let (mut second, mut nanos) = (0, 0);
    if p.eat(b':') {
        second = p.digits(1, 2)?;
        if p.eat(b'.') || p.eat(b',') {
            let start = p.i;
            let frac = p.digits(1, 9)?;
            let len = u32::try_from(p.i - start).ok()?;
            nanos = frac * 10u32.pow(9 - len);
        }
    }
    while p.eat(b' ') {}
    let offset_seconds = if p.at_end() || p.eat(b'Z') || p.eat(b'z') {
        0
    } else {
        let sign = if p.eat(b'+') {
            1
        } else if p.eat(b'-') {
            -1
        } else {
            return None;
        };
        let hours = p.digits(2, 2)?;
        p.eat(b':');
        let minutes = if p.at_end() { 0 } else { p.digits(2, 2)? };
        if hours > 23 || minutes > 59 {
            return None;
        }
        sign * i32::try_from(hours * 3600 + minutes * 60).ok()?
    };
    if !p.at_end() {
        return None;
    }
    if year == 0 {
        // Year 0 does not exist in Python's datetime (nor in PostgreSQL).
        return None;
    }
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    let offset = FixedOffset::east_opt(offset_seconds)?;
    let local = offset
        .from_local_datetime(&NaiveDateTime::new(date, time))
        .single()?;
    Some(local.with_timezone(&Utc))
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn at_end(&self) -> bool {
        self.i == self.s.len()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }

    /// Between `min` and `max` ASCII digits as a number.
    fn digits(&mut self, min: usize, max: usize) -> Option<u32> {
        let start = self.i;
        let mut value: u32 = 0;
        while self.i - start < max {
            match self.s.get(self.i) {
                Some(d @ b'0'..=b'9') => {
                    value = value * 10 + u32::from(d - b'0');
                    self.i += 1;
                }
                _ => break,
            }
        }
        (self.i - start >= min).then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Every shape the original accepted reads as the same instant.
    #[test]
    fn accepted_shapes_read_as_the_expected_instant() {
        let cases = [
            ("2025-04-10T12:34:56.000Z", "2025-04-10T12:34:56Z"),
            ("2025-04-10T12:34:56Z", "2025-04-10T12:34:56Z"),
            ("2025-04-10T12:34:56", "2025-04-10T12:34:56Z"),
            ("2025-04-10 12:34:56", "2025-04-10T12:34:56Z"),
            ("2025-04-10T12:34", "2025-04-10T12:34:00Z"),
            ("2025-04-10T15:34:56.000+03:00", "2025-04-10T12:34:56Z"),
            ("2025-04-10T15:34:56+0300", "2025-04-10T12:34:56Z"),
            ("2025-04-10T09:34:56-03", "2025-04-10T12:34:56Z"),
            ("2025-04-10T12:34:56.123456Z", "2025-04-10T12:34:56.123456Z"),
            ("2025-04-10T12:34:56,5Z", "2025-04-10T12:34:56.5Z"),
            ("2025-4-9T1:2:3Z", "2025-04-09T01:02:03Z"),
            ("  2025-04-10T12:34:56Z  ", "2025-04-10T12:34:56Z"),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), Some(utc(expected)), "input {input:?}");
        }
    }

    /// Anything else is rejected rather than guessed at.
    #[test]
    fn malformed_or_impossible_values_are_rejected() {
        for input in [
            "",
            "2025-04-10",
            "10/04/2025 12:00",
            "2025-13-01T00:00:00Z",
            "2025-02-30T00:00:00Z",
            "2025-04-10T25:00:00Z",
            "2025-04-10T12:34:56+25:00",
            "2025-04-10T12:34:56Zjunk",
            "2025-04-10T12:34:56.Z",
            "1744287299",
            "25-04-10T12:34:56Z",
            "0000-01-01T00:00:00Z",
        ] {
            assert_eq!(parse(input), None, "input {input:?}");
        }
    }
}
