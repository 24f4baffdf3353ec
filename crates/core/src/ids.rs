//! Identifiers. Entity ids are chosen by the caller (so a gateway's own user
//! ids can be used) or generated; either way they match `[A-Za-z0-9._-]{1,64}`
//! and are neither `.` nor `..`.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The longest entity id, in bytes.
pub const ID_LEN_MAX: usize = 64;
/// The longest request id, in bytes.
pub const REQUEST_ID_LEN_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} may only contain A-Z, a-z, 0-9, '.', '_' and '-'")]
    Forbidden { what: &'static str },
    #[error("{what} may not be `.` or `..` (they name no path segment in a URL)")]
    Dots { what: &'static str },
    #[error("{what} may only contain printable ASCII without spaces")]
    NotPrintable { what: &'static str },
}

/// Checks an entity id: `[A-Za-z0-9._-]{1,64}`, neither `.` nor `..`.
pub fn check_id(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > ID_LEN_MAX {
        return Err(IdError::TooLong {
            what,
            max: ID_LEN_MAX,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(IdError::Forbidden { what });
    }
    if s == "." || s == ".." {
        return Err(IdError::Dots { what });
    }
    Ok(())
}

/// Checks a request id: 1 to 128 bytes of printable ASCII without spaces, so
/// that any gateway's request ids fit.
pub fn check_request_id(s: &str) -> Result<(), IdError> {
    let what = "request_id";
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > REQUEST_ID_LEN_MAX {
        return Err(IdError::TooLong {
            what,
            max: REQUEST_ID_LEN_MAX,
        });
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(IdError::NotPrintable { what });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub const WHAT: &'static str = $what;

            pub fn new(s: &str) -> Result<Self, IdError> {
                check_id($what, s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// An organization: the tenant.
    OrgId,
    "org id"
);
id_type!(
    /// A member of an org.
    UserId,
    "user id"
);
id_type!(
    /// A named set of users.
    GroupId,
    "group id"
);
id_type!(
    /// An API key.
    KeyId,
    "key id"
);
id_type!(
    /// An org admin token (its id, never the token).
    TokenId,
    "token id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_only() {
        assert!(UserId::new("alice.smith_01-x").is_ok());
        // `.` and `..` are path segments a URL resolves away: a client
        // naming such an id would reach another route.
        for dots in [".", ".."] {
            assert_eq!(
                GroupId::new(dots),
                Err(IdError::Dots { what: "group id" }),
                "{dots}"
            );
        }
        assert!(GroupId::new("...").is_ok());
        assert!(GroupId::new("a..b").is_ok());
        assert!(UserId::new(&"a".repeat(64)).is_ok());
        assert_eq!(
            UserId::new(&"a".repeat(65)),
            Err(IdError::TooLong {
                what: "user id",
                max: 64
            })
        );
        assert_eq!(UserId::new(""), Err(IdError::Empty { what: "user id" }));
        for bad in ["a b", "a/b", "ä", "a;drop", "a\n", "'", "%"] {
            assert_eq!(
                UserId::new(bad),
                Err(IdError::Forbidden { what: "user id" }),
                "{bad}"
            );
        }
    }

    #[test]
    fn request_ids_are_printable_ascii() {
        assert!(check_request_id("req:1/2#3").is_ok());
        assert!(check_request_id("a b").is_err());
        assert!(check_request_id("").is_err());
        assert!(check_request_id(&"r".repeat(129)).is_err());
    }

    #[test]
    fn ids_round_trip_through_json_and_reject_bad_ones() {
        let id: OrgId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"acme\"");
        assert!(serde_json::from_str::<OrgId>("\"ac me\"").is_err());
    }
}
