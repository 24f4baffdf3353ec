//! Opaque page cursors: hex of a small JSON array, so clients cannot build
//! or edit them by accident, and a malformed one is a clear 400.

use serde_json::{Value, json};
use tally_store::query::{Cursor, SortValue, UserSort};

use crate::error::ApiError;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 4096 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn bad() -> ApiError {
    ApiError::invalid("cursor is malformed or belongs to another listing")
}

fn decode(s: &str) -> Result<Vec<Value>, ApiError> {
    let bytes = unhex(s).ok_or_else(bad)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Array(v)) => Ok(v),
        _ => Err(bad()),
    }
}

/// Where the next page of a user listing starts: after `after` (its last
/// row), and, for a live sort, at `offset` in the snapshot `snapshot`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UserCursor {
    pub(crate) after: Cursor,
    pub(crate) snapshot: Option<(u64, u64)>,
}

pub(crate) fn encode_user(sort: UserSort, c: &UserCursor) -> String {
    let value = match &c.after.value {
        SortValue::Int(i) => json!(i),
        SortValue::Text(t) => json!(t),
    };
    let v = match c.snapshot {
        // The id as a string: JSON numbers beyond 2^53 lose digits in some
        // clients, and a cursor should survive being stored by one.
        Some((id, offset)) => {
            json!([
                "users",
                sort.as_str(),
                value,
                c.after.id,
                format!("{id:x}"),
                offset
            ])
        }
        None => json!(["users", sort.as_str(), value, c.after.id]),
    };
    hex(v.to_string().as_bytes())
}

pub(crate) fn decode_user(sort: UserSort, s: &str) -> Result<UserCursor, ApiError> {
    let v = decode(s)?;
    let (head, snapshot) = match v.as_slice() {
        [head @ .., Value::String(id), Value::Number(offset)] if head.len() == 4 => (
            head,
            Some((
                u64::from_str_radix(id, 16).map_err(|_| bad())?,
                offset.as_u64().ok_or_else(bad)?,
            )),
        ),
        head => (head, None),
    };
    match head {
        [
            Value::String(list),
            Value::String(key),
            value,
            Value::String(id),
        ] if list == "users" && key == sort.as_str() => {
            let value = match value {
                Value::String(t) if sort.is_text() => SortValue::Text(t.clone()),
                Value::Number(n) if !sort.is_text() => SortValue::Int(n.as_i64().ok_or_else(bad)?),
                _ => return Err(bad()),
            };
            Ok(UserCursor {
                after: Cursor {
                    value,
                    id: id.clone(),
                },
                snapshot,
            })
        }
        _ => Err(bad()),
    }
}

/// A cursor over a listing ordered by one string (an id) or number.
pub(crate) fn encode_after(list: &str, after: &Value) -> String {
    hex(json!([list, after]).to_string().as_bytes())
}

pub(crate) fn decode_after(list: &str, s: &str) -> Result<Value, ApiError> {
    match decode(s)?.as_slice() {
        [Value::String(l), after] if l == list => Ok(after.clone()),
        _ => Err(bad()),
    }
}

/// A page of a listing read with one row more than `limit`: the first
/// `limit` rows, and a cursor after the last of them when there was more.
pub(crate) fn page<T>(
    mut rows: Vec<T>,
    limit: usize,
    list: &str,
    after: impl Fn(&T) -> Value,
) -> crate::dto::ListJson<T> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = more
        .then(|| rows.last().map(|r| encode_after(list, &after(r))))
        .flatten();
    crate::dto::ListJson {
        items: rows,
        next_cursor,
    }
}

/// Where the next page of a listing by id starts: after the id in
/// `cursor` (none: the first page).
pub(crate) fn after_id(list: &str, cursor: Option<&str>) -> Result<Option<String>, ApiError> {
    cursor
        .map(|c| {
            decode_after(list, c)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(bad)
        })
        .transpose()
}

/// `?cursor=&limit=` of a listing.
/// An `order` parameter of a log: `oldest` first (the default) or `newest`.
pub(crate) fn newest_first(order: Option<&str>) -> Result<bool, ApiError> {
    match order {
        None | Some("oldest") => Ok(false),
        Some("newest") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "order must be oldest or newest, got {other:?}"
        ))),
    }
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageParams {
    /// `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
    /// Rows a page (default 50, at most 1 000).
    pub(crate) limit: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_other_listings() {
        let c = Cursor {
            value: SortValue::Int(-1),
            id: "a'b".into(),
        };
        for snapshot in [None, Some((u64::MAX, 50))] {
            let c = UserCursor {
                after: c.clone(),
                snapshot,
            };
            let s = encode_user(UserSort::Spend, &c);
            assert_eq!(decode_user(UserSort::Spend, &s).unwrap(), c);
            assert!(decode_user(UserSort::Name, &s).is_err());
        }
        assert!(decode_user(UserSort::Spend, "zz").is_err());
        let g = encode_after("groups", &json!("eng"));
        assert_eq!(decode_after("groups", &g).unwrap(), json!("eng"));
        assert!(decode_after("keys", &g).is_err());
    }
}
