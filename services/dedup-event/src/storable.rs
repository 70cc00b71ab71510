//! What PostgreSQL can store: an event's JSON text is checked against the limits of `jsonb`
//! and `text` input before ingest accepts it, so a `202` never names an event the database
//! will refuse.
//!
//! `jsonb` refuses `\u0000` (no `text` can hold NUL), an unpaired UTF-16 surrogate escape,
//! and numbers outside `numeric`'s range: more than 131,072 digits before the decimal point
//! or more than 16,383 after it (exponent included: `1e-16384` has 16,384). Nesting is
//! capped at [`MAX_DEPTH`], where serde_json's own parser stops, well inside PostgreSQL's
//! stack limit. The check is one pass over text that serde_json has already parsed, so it
//! reads only what is well-formed JSON.

use memchr::memchr2;

/// Deepest nesting of arrays and objects an event may have (the event object is level 1).
pub const MAX_DEPTH: usize = 128;
/// Most decimal digits `numeric` holds before the decimal point.
const MAX_INTEGER_DIGITS: i64 = 131_072;
/// Most decimal digits `numeric` holds after the decimal point.
const MAX_SCALE: i64 = 16_383;
/// PostgreSQL refuses an exponent of this magnitude or more before it looks at the digits.
const MAX_EXPONENT: i64 = i32::MAX as i64 / 2;

/// Why a JSON text cannot be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstorable {
    /// `\u0000` in a string or member name.
    Nul,
    /// A `\uD800`–`\uDFFF` escape without its other half.
    LoneSurrogate,
    /// A number `numeric` cannot hold.
    NumberOutOfRange,
    /// Arrays and objects nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

impl Unstorable {
    /// The message a client gets for the member that holds the problem.
    pub fn message(self) -> String {
        match self {
            Unstorable::Nul => "Contains the character U+0000, which cannot be stored.".into(),
            Unstorable::LoneSurrogate => {
                "Contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which cannot be \
                 stored."
                    .into()
            }
            Unstorable::NumberOutOfRange => format!(
                "Contains a number out of range: at most {MAX_INTEGER_DIGITS} digits before the \
                 decimal point and {MAX_SCALE} after it can be stored."
            ),
            Unstorable::TooDeep => format!("Nested more than {MAX_DEPTH} levels deep."),
        }
    }
}

/// Checks one well-formed JSON value found at nesting `depth` (0 for a whole document).
pub fn check(text: &[u8], depth: usize) -> Result<(), Unstorable> {
    let mut depth = depth;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => i = string_end(text, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Unstorable::TooDeep);
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(text, i);
                check_number(&text[i..end])?;
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Checks a member name as serde_json unescaped it (surrogates are already refused there).
pub fn check_name(name: &str) -> Result<(), Unstorable> {
    if name.contains('\0') {
        Err(Unstorable::Nul)
    } else {
        Ok(())
    }
}

/// The index just past the string whose contents start at `i`, checking its escapes. (An
/// unterminated string cannot occur in parsed JSON; it would end the scan.)
fn string_end(text: &[u8], mut i: usize) -> Result<usize, Unstorable> {
    loop {
        let Some(offset) = memchr2(b'"', b'\\', text.get(i..).unwrap_or_default()) else {
            return Ok(text.len());
        };
        let at = i + offset;
        if text[at] == b'"' {
            return Ok(at + 1);
        }
        match text.get(at + 1) {
            Some(b'u') => {
                let unit = hex4(text, at + 2);
                match unit {
                    Some(0) => return Err(Unstorable::Nul),
                    Some(0xD800..=0xDBFF) => {
                        let low = (text.get(at + 6..at + 8) == Some(b"\\u"))
                            .then(|| hex4(text, at + 8))
                            .flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Err(Unstorable::LoneSurrogate);
                        }
                        i = at + 12;
                    }
                    Some(0xDC00..=0xDFFF) => return Err(Unstorable::LoneSurrogate),
                    _ => i = at + 6,
                }
            }
            _ => i = at + 2,
        }
    }
}

fn hex4(text: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(text.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

fn number_end(text: &[u8], start: usize) -> usize {
    start
        + text[start..]
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .unwrap_or(text.len() - start)
}

/// Whether `numeric` takes this JSON number: the digits before the decimal point of its
/// leading digit and the digits after the point, exponent applied, within PostgreSQL's limits.
fn check_number(number: &[u8]) -> Result<(), Unstorable> {
    let unsigned = number.strip_prefix(b"-").unwrap_or(number);
    let (mantissa, exponent) = match unsigned.iter().position(|b| matches!(b, b'e' | b'E')) {
        Some(at) => (&unsigned[..at], exponent(&unsigned[at + 1..])?),
        None => (unsigned, 0),
    };
    let (integer, fraction) = match mantissa.iter().position(|&b| b == b'.') {
        Some(at) => (&mantissa[..at], &mantissa[at + 1..]),
        None => (mantissa, &b""[..]),
    };
    let scale = i64::try_from(fraction.len()).unwrap_or(i64::MAX) - exponent;
    if scale > MAX_SCALE {
        return Err(Unstorable::NumberOutOfRange);
    }
    // The decimal weight of the leading non-zero digit (0 for units, -1 for tenths).
    let weight = if let Some(k) = integer.iter().position(|&b| b != b'0') {
        integer.len() - 1 - k
    } else if let Some(k) = fraction.iter().position(|&b| b != b'0') {
        return check_weight(-1 - k as i64 + exponent);
    } else {
        return Ok(()); // zero
    };
    check_weight(weight as i64 + exponent)
}

fn check_weight(weight: i64) -> Result<(), Unstorable> {
    if weight >= MAX_INTEGER_DIGITS {
        Err(Unstorable::NumberOutOfRange)
    } else {
        Ok(())
    }
}

fn exponent(text: &[u8]) -> Result<i64, Unstorable> {
    let (negative, digits) = match text.first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let digits = &digits[digits.iter().take_while(|&&b| b == b'0').count()..];
    let magnitude = if digits.len() > 12 {
        i64::MAX
    } else {
        digits
            .iter()
            .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'))
    };
    if magnitude >= MAX_EXPONENT {
        return Err(Unstorable::NumberOutOfRange);
    }
    Ok(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each input and whether PostgreSQL 15's `jsonb` input takes it (read off `psql`).
    #[test]
    fn the_table_matches_what_postgres_takes() {
        let cases: &[(&str, Result<(), Unstorable>)] = &[
            (r#"{"a":"plain"}"#, Ok(())),
            (r#"{"a":"\u0000"}"#, Err(Unstorable::Nul)),
            (r#"{"a":"x\\u0000"}"#, Ok(())), // an escaped backslash, then text
            (r#"{"a":"\u0001\u00e9"}"#, Ok(())),
            (r#"{"a":"\ud83d\ude00"}"#, Ok(())),
            (r#"{"a":"\ud800"}"#, Err(Unstorable::LoneSurrogate)),
            (r#"{"a":"\ud800x"}"#, Err(Unstorable::LoneSurrogate)),
            (r#"{"a":"\ud800\u0041"}"#, Err(Unstorable::LoneSurrogate)),
            (r#"{"a":"\udc00"}"#, Err(Unstorable::LoneSurrogate)),
            ("1e400", Ok(())),
            ("1e131071", Ok(())),
            ("123e131069", Ok(())),
            ("1e131072", Err(Unstorable::NumberOutOfRange)),
            ("1e+131071", Ok(())),
            ("1e-16383", Ok(())),
            ("1e-16382", Ok(())),
            ("1e-16384", Err(Unstorable::NumberOutOfRange)),
            ("1.5e-16383", Err(Unstorable::NumberOutOfRange)),
            ("0.1e-16383", Err(Unstorable::NumberOutOfRange)),
            ("0e999999", Ok(())),
            ("0e-20000", Err(Unstorable::NumberOutOfRange)),
            ("-1e200000", Err(Unstorable::NumberOutOfRange)),
            ("1e99999999999999999999", Err(Unstorable::NumberOutOfRange)),
            ("18446744073709551617", Ok(())),
            (r#"{"a":[1,{"b":"\""},-2.5E+3]}"#, Ok(())),
        ];
        for (text, want) in cases {
            assert_eq!(check(text.as_bytes(), 0), *want, "{text}");
        }
    }

    /// Nesting is counted across arrays and objects, from the depth the value sits at.
    #[test]
    fn nesting_is_capped() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check(nested(MAX_DEPTH).as_bytes(), 0), Ok(()));
        assert_eq!(
            check(nested(MAX_DEPTH).as_bytes(), 1),
            Err(Unstorable::TooDeep)
        );
        assert_eq!(
            check(nested(MAX_DEPTH + 1).as_bytes(), 0),
            Err(Unstorable::TooDeep)
        );
        // Brackets inside strings are text.
        assert_eq!(check(br#"["[[[[", "]"]"#, MAX_DEPTH - 1), Ok(()));
    }

    #[test]
    fn names_with_nul_are_refused() {
        assert_eq!(check_name("a\0b"), Err(Unstorable::Nul));
        assert_eq!(check_name("é"), Ok(()));
    }
}
