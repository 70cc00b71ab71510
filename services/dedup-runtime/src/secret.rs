//! Keeping credentials out of what a process prints: error messages, logs, `--help` and the
//! operator's status conditions show a connection URL only with its password masked, and a
//! value that is not a URL at all (a Secret key holding something else) not at all.

/// A connection URL that may hold a password: `Debug` and `Display` show it redacted
/// ([`redact_url`]); only [`SecretUrl::expose`] gives the text, for the connection itself.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL itself, to connect with. Never log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl From<&str> for SecretUrl {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl From<String> for SecretUrl {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `value` as it may be shown: a URL with its password replaced by `***`; anything that does
/// not parse as a URL with a host, as `<not a URL>` (it may be the secret itself).
pub fn redact_url(value: &str) -> String {
    match url::Url::parse(value.trim()) {
        Ok(mut url) if url.has_host() => {
            if url.password().is_some() {
                // Only fails for URLs that cannot have credentials, which this one has.
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        _ => "<not a URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passwords are masked, the rest kept so the URL still says where it points; a value that
    /// is not a URL is not echoed at all.
    #[test]
    fn urls_lose_their_passwords_and_non_urls_vanish() {
        assert_eq!(
            redact_url("amqp://guest:S3CRET@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@db/dedup?sslmode=require"),
            "postgres://u:***@db/dedup?sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:S3CRET@cache:6379"),
            "redis://:***@cache:6379"
        );
        assert_eq!(redact_url("http://rabbit:15672"), "http://rabbit:15672/");
        for secret in ["S3CRET", "user:S3CRET@", "", "  S3CRET  ", "mailto:S3CRET"] {
            assert_eq!(redact_url(secret), "<not a URL>", "{secret}");
        }
    }

    /// A secret URL formats redacted however it is printed; `expose` gives it whole.
    #[test]
    fn secret_urls_print_redacted() {
        let url: SecretUrl = "redis://:S3CRET@cache:6379".parse().unwrap();
        assert_eq!(format!("{url}"), "redis://:***@cache:6379");
        assert_eq!(format!("{url:?}"), "\"redis://:***@cache:6379\"");
        assert_eq!(
            format!("{:#?}", Some(url.clone()))
                .matches("S3CRET")
                .count(),
            0
        );
        assert_eq!(url.expose(), "redis://:S3CRET@cache:6379");
    }
}
