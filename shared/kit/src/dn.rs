//! Distinguished names (RFC 4514) in one canonical spelling, so that a group DN as an owner typed it and the same
//! DN as the directory returned it compare equal.
//!
//! [`normalize`] applies this rule, and two DNs name the same entry when their normal forms are equal:
//! - the DN is split into RDNs at unescaped `,` and each RDN into attribute-value pairs at unescaped `+`;
//! - whitespace around `,`, `+` and `=` is dropped;
//! - attribute types are lowercased, and the usual long names and OIDs become the short name
//!   (`commonName`, `2.5.4.3` and `OID.2.5.4.3` are all `cn`; likewise `ou`, `o`, `dc`, `uid`, `c`, `l`, `st`,
//!   `street`);
//! - escapes are decoded: `\,` and `\2C` are the same comma, and hex pairs spell UTF-8 (`\C3\A9` is `é`);
//! - values are compared as the `caseIgnoreMatch` of directories compares `cn`, `ou`, `dc` and `o` (RFC 4518):
//!   lowercased (Unicode), leading and trailing whitespace dropped (escaped or not) and inner runs of whitespace
//!   made one space. The same holds for every attribute type, since group DNs are named by these;
//! - the pairs of a multi-valued RDN are sorted;
//! - a value written as `#` and hex digits (its BER encoding) is kept as such, with lowercase digits;
//! - the result is written back with the fewest escapes RFC 4514 allows: `\` before `,` `+` `"` `\` `<` `>` `;`,
//!   before a leading `#`, and `\00` for NUL.
//!
//! So `CN=Ops, OU=Teams,DC=Example,DC=Com`, `cn=ops,ou=teams,dc=example,dc=com` and
//! `2.5.4.3=OPS,ou=Teams,dc=example,dc=com` are all `cn=ops,ou=teams,dc=example,dc=com`.

/// Why a string is not a distinguished name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnError {
    /// The string is empty or blank.
    #[error("is empty")]
    Empty,
    /// An RDN lacks the `=` between its attribute type and value.
    #[error("{rdn:?} is not TYPE=VALUE: an unescaped , or + ends each TYPE=VALUE pair")]
    MissingEquals {
        /// The text of the RDN, up to where it ended.
        rdn: String,
    },
    /// An attribute type is neither a name nor a dotted OID.
    #[error(
        "{0:?} is not an attribute type: expected a name (a letter, then letters, digits and dashes) or a dotted OID"
    )]
    AttributeType(String),
    /// A backslash is followed by neither a special character nor two hex digits.
    #[error("bad escape at byte {0}: \\ must come before one of ,+\"\\<>;=# and space, or two hex digits")]
    Escape(usize),
    /// A character that must be escaped is not.
    #[error("unescaped {character:?} at byte {at}: write it as \\{character}")]
    Unescaped {
        /// The character.
        character: char,
        /// Its byte offset in the DN.
        at: usize,
    },
    /// Hex escapes spell bytes that are not UTF-8.
    #[error("the hex escapes of the value of {0:?} do not spell UTF-8")]
    NotUtf8(String),
    /// A value written as `#` and hex digits is not an even number of hex digits.
    #[error("the value of {0:?} starts with an unescaped # but is not hex digits: write \\# for a literal #")]
    HexValue(String),
}

/// Returns the normal form of `dn` under the rule of this module.
///
/// # Errors
/// Returns why `dn` is not a DN: empty, an RDN without `=`, a bad attribute type or escape, an unescaped special
/// character, or hex escapes that are not UTF-8.
pub fn normalize(dn: &str) -> Result<String, DnError> {
    if dn.trim().is_empty() {
        return Err(DnError::Empty);
    }
    let mut parser = Parser { dn, at: 0 };
    let mut rdns: Vec<Vec<(String, String)>> = Vec::new();
    let mut rdn = Vec::new();
    loop {
        let start = parser.at;
        let kind = parser.attribute_type(start)?;
        let value = parser.value(&kind)?;
        rdn.push((kind, value));
        match parser.next() {
            Some((_, '+')) => {}
            Some((_, ',')) => rdns.push(std::mem::take(&mut rdn)),
            None => {
                rdns.push(rdn);
                break;
            }
            Some((at, character)) => return Err(DnError::Unescaped { character, at }),
        }
    }
    let mut normal = String::with_capacity(dn.len());
    for (index, mut rdn) in rdns.into_iter().enumerate() {
        if index > 0 {
            normal.push(',');
        }
        rdn.sort();
        for (pair, (kind, value)) in rdn.iter().enumerate() {
            if pair > 0 {
                normal.push('+');
            }
            normal.push_str(kind);
            normal.push('=');
            normal.push_str(value);
        }
    }
    Ok(normal)
}

/// Returns the normal form of `dn`, or, when `dn` is not a DN, its trimmed lowercase: the key comparisons use, so
/// that a string that does not parse still equals itself in any case.
pub fn normalize_lenient(dn: &str) -> String {
    normalize(dn).unwrap_or_else(|_| dn.trim().to_lowercase())
}

/// Whether `a` and `b` name the same entry: their [`normalize_lenient`] forms are equal.
pub fn same(a: &str, b: &str) -> bool {
    normalize_lenient(a) == normalize_lenient(b)
}

/// Well-known attribute types by their lowercase long names and OIDs, and the short name they normalise to.
const ALIASES: &[(&str, &str)] = &[
    ("commonname", "cn"),
    ("2.5.4.3", "cn"),
    ("countryname", "c"),
    ("2.5.4.6", "c"),
    ("localityname", "l"),
    ("2.5.4.7", "l"),
    ("stateorprovincename", "st"),
    ("2.5.4.8", "st"),
    ("streetaddress", "street"),
    ("2.5.4.9", "street"),
    ("organizationname", "o"),
    ("2.5.4.10", "o"),
    ("organizationalunitname", "ou"),
    ("2.5.4.11", "ou"),
    ("userid", "uid"),
    ("0.9.2342.19200300.100.1.1", "uid"),
    ("domaincomponent", "dc"),
    ("0.9.2342.19200300.100.1.25", "dc"),
];

/// Characters written with a backslash in a normalised value, wherever they occur.
const SPECIAL: &[char] = &[',', '+', '"', '\\', '<', '>', ';'];

/// Reads a DN from left to right.
struct Parser<'a> {
    dn: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<(usize, char)> {
        self.dn[self.at..].chars().next().map(|character| (self.at, character))
    }

    fn next(&mut self) -> Option<(usize, char)> {
        let next = self.peek()?;
        self.at += next.1.len_utf8();
        Some(next)
    }

    fn skip_whitespace(&mut self) {
        while let Some((_, character)) = self.peek()
            && character.is_whitespace()
        {
            self.next();
        }
    }

    /// Reads an attribute type and its `=`, returning the type in normal form; `start` is where the RDN began.
    fn attribute_type(&mut self, start: usize) -> Result<String, DnError> {
        loop {
            match self.next() {
                Some((end, '=')) => {
                    let raw = self.dn[start..end].trim();
                    return normal_type(raw);
                }
                Some((end, ',' | '+')) => {
                    return Err(DnError::MissingEquals {
                        rdn: self.dn[start..end].trim().to_owned(),
                    });
                }
                Some(_) => {}
                None => {
                    return Err(DnError::MissingEquals {
                        rdn: self.dn[start..].trim().to_owned(),
                    });
                }
            }
        }
    }

    /// Reads a value up to (not including) the unescaped `,` or `+` that ends it, returning it in normal form.
    fn value(&mut self, kind: &str) -> Result<String, DnError> {
        self.skip_whitespace();
        if let Some((_, '#')) = self.peek() {
            return self.hex_value(kind);
        }
        let mut bytes = Vec::new();
        while let Some((at, character)) = self.peek() {
            match character {
                ',' | '+' => break,
                '\\' => {
                    self.next();
                    bytes.extend(self.escape(at)?);
                }
                '"' | ';' | '<' | '>' | '\0' => return Err(DnError::Unescaped { character, at }),
                _ => {
                    self.next();
                    let mut buffer = [0; 4];
                    bytes.extend_from_slice(character.encode_utf8(&mut buffer).as_bytes());
                }
            }
        }
        let text = String::from_utf8(bytes).map_err(|_| DnError::NotUtf8(kind.to_owned()))?;
        let folded = text.to_lowercase();
        let mut value = String::with_capacity(folded.len());
        for (index, word) in folded.split_whitespace().enumerate() {
            if index > 0 {
                value.push(' ');
            }
            value.push_str(word);
        }
        Ok(escape(&value))
    }

    /// Decodes the escape whose backslash is at `at` (already read).
    fn escape(&mut self, at: usize) -> Result<Vec<u8>, DnError> {
        let Some((_, first)) = self.next() else {
            return Err(DnError::Escape(at));
        };
        if let Some(high) = first.to_digit(16) {
            let low = self
                .next()
                .and_then(|(_, second)| second.to_digit(16))
                .ok_or(DnError::Escape(at))?;
            let byte = u8::try_from(high * 16 + low).map_err(|_| DnError::Escape(at))?;
            return Ok(vec![byte]);
        }
        if matches!(first, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' | '#' | ' ') {
            return Ok(vec![u8::try_from(first).map_err(|_| DnError::Escape(at))?]);
        }
        Err(DnError::Escape(at))
    }

    /// Reads a value written as `#` and hex digits, keeping it in that form with lowercase digits.
    fn hex_value(&mut self, kind: &str) -> Result<String, DnError> {
        let start = self.at;
        while let Some((_, character)) = self.peek()
            && character != ','
            && character != '+'
        {
            self.next();
        }
        let raw = self.dn[start..self.at].trim_end();
        let digits = &raw[1..];
        if digits.is_empty()
            || !digits.len().is_multiple_of(2)
            || !digits.chars().all(|digit| digit.is_ascii_hexdigit())
        {
            return Err(DnError::HexValue(kind.to_owned()));
        }
        Ok(format!("#{}", digits.to_ascii_lowercase()))
    }
}

/// Checks an attribute type and returns it lowercased, or as the short name of a long name or OID.
fn normal_type(raw: &str) -> Result<String, DnError> {
    let lower = raw.to_ascii_lowercase();
    let lower = match lower.strip_prefix("oid.") {
        Some(oid) if is_oid(oid) => oid.to_owned(),
        _ => lower,
    };
    let name = lower.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && lower.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
    if !name && !is_oid(&lower) {
        return Err(DnError::AttributeType(raw.to_owned()));
    }
    Ok(ALIASES
        .iter()
        .find(|(alias, _)| *alias == lower)
        .map_or(lower, |(_, short)| (*short).to_owned()))
}

/// Whether `text` is a dotted OID: numbers without leading zeros, separated by dots.
fn is_oid(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|number| {
            !number.is_empty()
                && number.bytes().all(|byte| byte.is_ascii_digit())
                && (number == "0" || !number.starts_with('0'))
        })
        && text.contains('.')
}

/// Writes a decoded value with the escapes RFC 4514 requires.
fn escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for (index, character) in value.chars().enumerate() {
        if SPECIAL.contains(&character) || (index == 0 && character == '#') {
            escaped.push('\\');
            escaped.push(character);
        } else if character == '\0' {
            escaped.push_str("\\00");
        } else {
            escaped.push(character);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: &str = "cn=ops,ou=teams,dc=example,dc=com";

    #[test]
    fn spellings_of_one_dn_share_one_normal_form() {
        let cases = [
            ("canonical", OPS, OPS),
            ("upper-case types and values", "CN=Ops,OU=Teams,DC=Example,DC=Com", OPS),
            ("spaces after commas", "cn=ops, ou=teams, dc=example, dc=com", OPS),
            (
                "spaces around = and ,",
                "  cn = Ops ,ou= teams ,  dc =example,dc=com  ",
                OPS,
            ),
            ("tabs and newlines", "cn=ops,\tou=teams,\ndc=example,dc=com", OPS),
            (
                "long names",
                "commonName=ops,organizationalUnitName=teams,domainComponent=example,DC=com",
                OPS,
            ),
            (
                "OIDs",
                "2.5.4.3=ops,2.5.4.11=teams,0.9.2342.19200300.100.1.25=example,dc=com",
                OPS,
            ),
            ("OID. prefix", "OID.2.5.4.3=ops,ou=teams,dc=example,dc=com", OPS),
            (
                "hex escapes of plain characters",
                "cn=\\6Fps,ou=te\\61ms,dc=example,dc=com",
                OPS,
            ),
            ("inner spaces collapse", "cn=ML   Team,ou=teams", "cn=ml team,ou=teams"),
            (
                "escaped leading space is insignificant",
                "cn=\\ ops,ou=teams",
                "cn=ops,ou=teams",
            ),
            (
                "escaped comma",
                "cn=Smith\\, John,ou=people",
                "cn=smith\\, john,ou=people",
            ),
            (
                "hex-escaped comma",
                "cn=Smith\\2C John,ou=people",
                "cn=smith\\, john,ou=people",
            ),
            (
                "lowercase hex escape",
                "cn=Smith\\2c John,ou=people",
                "cn=smith\\, john,ou=people",
            ),
            ("escaped plus", "cn=a\\2Bb,ou=x", "cn=a\\+b,ou=x"),
            ("escaped equals needs no escape", "cn=a\\=b,ou=x", "cn=a=b,ou=x"),
            ("unescaped equals in a value", "cn=a=b,ou=x", "cn=a=b,ou=x"),
            (
                "escaped quotes and angles",
                "cn=\\\"q\\\" \\<a\\>\\;,ou=x",
                "cn=\\\"q\\\" \\<a\\>\\;,ou=x",
            ),
            ("escaped leading hash", "cn=\\#1,ou=x", "cn=\\#1,ou=x"),
            ("hash inside needs no escape", "cn=a#1,ou=x", "cn=a#1,ou=x"),
            ("escaped backslash", "cn=a\\\\b,ou=x", "cn=a\\\\b,ou=x"),
            ("UTF-8 by hex escapes", "cn=Ren\\C3\\A9,ou=x", "cn=rené,ou=x"),
            ("UTF-8 as is, upper case", "CN=RENÉ,OU=X", "cn=rené,ou=x"),
            (
                "multi-valued RDN sorted",
                "UID=jo+CN=Jo Smith,ou=people",
                "cn=jo smith+uid=jo,ou=people",
            ),
            (
                "multi-valued RDN with spaces",
                "cn=jo smith + uid=jo ,ou=people",
                "cn=jo smith+uid=jo,ou=people",
            ),
            ("BER value kept in hex", "cn=#04024869,ou=x", "cn=#04024869,ou=x"),
            (
                "BER value with upper-case digits",
                "CN=#0402486A ,ou=x",
                "cn=#0402486a,ou=x",
            ),
            ("empty value", "cn=,ou=x", "cn=,ou=x"),
            ("one RDN", "CN=Admins", "cn=admins"),
        ];
        for (case, dn, expected) in cases {
            assert_eq!(normalize(dn).as_deref(), Ok(expected), "{case}: {dn:?}");
            assert_eq!(
                normalize(expected).as_deref(),
                Ok(expected),
                "{case}: normal forms are fixed points"
            );
        }
    }

    #[test]
    fn different_dns_stay_different() {
        let pairs = [
            ("cn=ops,ou=teams", "cn=ops,ou=team"),
            ("cn=ops,ou=teams", "ou=teams,cn=ops"),
            ("cn=a\\,b,ou=x", "cn=a,cn=b,ou=x"),
            ("cn=a\\+b,ou=x", "cn=a+b=,ou=x"),
            ("cn=ml team,ou=x", "cn=mlteam,ou=x"),
            ("cn=\\#1,ou=x", "cn=#01,ou=x"),
            ("uid=ops,ou=teams", "cn=ops,ou=teams"),
        ];
        for (a, b) in pairs {
            assert_ne!(normalize(a), normalize(b), "{a:?} and {b:?}");
            assert!(!same(a, b), "{a:?} and {b:?}");
        }
    }

    #[test]
    fn malformed_dns_are_refused_with_the_reason() {
        let cases = [
            ("", DnError::Empty),
            ("   ", DnError::Empty),
            ("ops", DnError::MissingEquals { rdn: "ops".into() }),
            ("cn=ops,teams", DnError::MissingEquals { rdn: "teams".into() }),
            ("cn=ops,,dc=x", DnError::MissingEquals { rdn: String::new() }),
            ("cn=ops,", DnError::MissingEquals { rdn: String::new() }),
            ("cn=a+,ou=x", DnError::MissingEquals { rdn: String::new() }),
            ("=ops", DnError::AttributeType(String::new())),
            ("c n=ops", DnError::AttributeType("c n".into())),
            ("1cn=ops", DnError::AttributeType("1cn".into())),
            ("1.02=ops", DnError::AttributeType("1.02".into())),
            ("cn\\=x=ops", DnError::AttributeType("cn\\".into())),
            ("cn=ops\\", DnError::Escape(6)),
            ("cn=o\\ps", DnError::Escape(4)),
            ("cn=o\\4", DnError::Escape(4)),
            ("cn=o\\4g", DnError::Escape(4)),
            ("cn=\"ops\"", DnError::Unescaped { character: '"', at: 3 }),
            ("cn=a;ou=x", DnError::Unescaped { character: ';', at: 4 }),
            ("cn=<a>", DnError::Unescaped { character: '<', at: 3 }),
            ("cn=\\C3,ou=x", DnError::NotUtf8("cn".into())),
            ("cn=#0g,ou=x", DnError::HexValue("cn".into())),
            ("cn=#123,ou=x", DnError::HexValue("cn".into())),
            ("cn=#,ou=x", DnError::HexValue("cn".into())),
        ];
        for (dn, expected) in cases {
            assert_eq!(normalize(dn), Err(expected), "{dn:?}");
        }
        assert!(
            DnError::Escape(4).to_string().contains("two hex digits"),
            "the message says what is accepted"
        );
    }

    #[test]
    fn lenient_keys_fall_back_to_lowercase_for_what_is_not_a_dn() {
        assert_eq!(normalize_lenient(" CN=Ops, OU=Teams "), "cn=ops,ou=teams");
        assert_eq!(normalize_lenient(" Not A DN "), "not a dn");
        assert!(same("CN=Ops,OU=Teams", "cn=ops, ou=teams"));
        assert!(same("Weird;Thing", "weird;thing"));
    }
}
