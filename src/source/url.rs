//! Database URLs (`postgres://`, `mysql://`): their parts, decoded, and never a password.
//!
//! A password in a URL would end up in process listings, shell history and logs, so it is
//! refused outright; passwords come from a file or a systemd credential instead.

use crate::error::{Error, Result};

/// The parts of `scheme://[user@][host][:port][/database][?key=value&...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbUrl {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    /// The path without its leading `/`, if not empty.
    pub database: Option<String>,
    pub query: Vec<(String, String)>,
    /// The URL with any password hidden, for messages.
    pub shown: String,
}

impl DbUrl {
    /// Parses `url`, whose scheme must be one of `schemes`.
    pub fn parse(url: &str, schemes: &[&str]) -> Result<DbUrl> {
        let shown = redact(url);
        let bad = |why: String| Error::invalid(format!("database URL {shown}: {why}"));
        let u = parse_url(url).map_err(|e| bad(e.to_string()))?;
        if !schemes.contains(&u.scheme()) {
            let want: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
            return Err(bad(format!("expected {}", want.join(" or "))));
        }
        if u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password") {
            return Err(bad(
                "holds a password; put it in --db-password-file (or the systemd credential \
                 kluis-db-password) so it never shows in the process list"
                    .into(),
            ));
        }
        let decode = |s: &str| {
            super::percent_decode(s)
                .ok_or_else(|| bad(format!("{s:?} is not valid percent-encoding")))
        };
        let host = match u.host_str().filter(|h| !h.is_empty() && *h != NO_HOST) {
            Some(h) => Some(decode(h.trim_start_matches('[').trim_end_matches(']'))?),
            None => None,
        };
        let user = match u.username() {
            "" => None,
            name => Some(decode(name)?),
        };
        let database = match u.path().trim_start_matches('/') {
            "" => None,
            path => Some(decode(path)?),
        };
        Ok(DbUrl {
            host,
            port: u.port(),
            user,
            database,
            query: u
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            shown,
        })
    }

    /// An error about this URL.
    pub fn error(&self, why: impl std::fmt::Display) -> Error {
        Error::invalid(format!("database URL {}: {why}", self.shown))
    }
}

/// The URL with any password replaced, for messages. Text that is not a URL (a path) is
/// returned as it is.
pub fn redact(url: &str) -> String {
    let Ok(mut u) = parse_url(url) else {
        return if url.contains("://") {
            "(unparsable URL)".into()
        } else {
            url.to_string()
        };
    };
    let query_secret = u.query_pairs().any(|(k, _)| k == "password");
    if u.password().is_none() && !query_secret {
        return url.to_string();
    }
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if query_secret {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    let shown = u.to_string();
    shown.replacen(&format!("@{NO_HOST}"), "@", 1)
}

/// Stands in for the empty host of `scheme://user@/db` (libpq's way to name a user and use
/// the default socket), which the `url` crate refuses.
const NO_HOST: &str = "kluis-no-host.invalid";

fn parse_url(url: &str) -> std::result::Result<url::Url, url::ParseError> {
    match url::Url::parse(url) {
        Err(url::ParseError::EmptyHost) => {
            let (scheme, rest) = url.split_once("://").ok_or(url::ParseError::EmptyHost)?;
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            match authority.strip_suffix('@') {
                Some(user) => url::Url::parse(&format!("{scheme}://{user}@{NO_HOST}{tail}")),
                None => Err(url::ParseError::EmptyHost),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_decoded_and_passwords_refused() {
        let u = DbUrl::parse(
            "mysql://app%40x@[::1]:3307/shop%20db?socket=/run/x.sock",
            &["mysql"],
        )
        .unwrap();
        assert_eq!(u.host.as_deref(), Some("::1"));
        assert_eq!(u.port, Some(3307));
        assert_eq!(u.user.as_deref(), Some("app@x"));
        assert_eq!(u.database.as_deref(), Some("shop db"));
        assert_eq!(u.query, [("socket".to_string(), "/run/x.sock".to_string())]);
        for secret in [
            "postgres://u:hunter2@h/db",
            "postgres://h/db?password=hunter2",
        ] {
            let e = DbUrl::parse(secret, &["postgres"]).unwrap_err().to_string();
            assert!(e.contains("password") && !e.contains("hunter2"), "{e}");
        }
        let e = DbUrl::parse("mysql://h/db", &["postgres", "postgresql"]).unwrap_err();
        assert!(
            e.to_string().contains("postgres:// or postgresql://"),
            "{e}"
        );
        assert_eq!(
            DbUrl::parse("postgres://h", &["postgres"])
                .unwrap()
                .database,
            None
        );
        assert_eq!(redact("postgress://u:pw@h/db"), "postgress://u:***@h/db");
        assert_eq!(redact("/srv/repo"), "/srv/repo");
        assert_eq!(
            redact("s3://b/p?endpoint=https://x"),
            "s3://b/p?endpoint=https://x"
        );
        // libpq's user on the default socket.
        let u = DbUrl::parse(
            "postgres://backup@/billing?host=/run/postgresql",
            &["postgres"],
        )
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("backup"));
        assert_eq!(u.host, None);
        assert_eq!(u.database.as_deref(), Some("billing"));
        assert_eq!(
            redact("postgres://backup:pw@/billing"),
            "postgres://backup:***@/billing"
        );
    }
}
