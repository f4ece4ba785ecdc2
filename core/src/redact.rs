//! Redaction of secrets in text that may reach a log line, an error or a terminal.

/// Replaces the password of every `scheme://user:password@host` URL in `text` with `***`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or whitespace.
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#') || c.is_whitespace() || c == '"' || c == '\''
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    redact_password_params(&out)
}

/// Replaces `password=...` query or keyword parameters.
fn redact_password_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("password=") {
        let (head, tail) = rest.split_at(pos + "password=".len());
        out.push_str(head);
        out.push_str("***");
        let end = tail
            .find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Removes every occurrence of each secret from `text`, then redacts URLs.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut s = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 3) {
        s = s.replace(secret, "***");
    }
    redact_urls(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_hidden() {
        assert_eq!(
            redact_urls("connect postgres://app:s3cr@t@db:5432/app failed"),
            "connect postgres://app:***@db:5432/app failed"
        );
        assert_eq!(
            redact_urls("postgres://app@db/app"),
            "postgres://app@db/app"
        );
        assert_eq!(
            redact_urls("postgres://db/app?sslmode=require&password=pw&x=1"),
            "postgres://db/app?sslmode=require&password=***&x=1"
        );
        assert_eq!(redact_urls("s3://bucket/prefix"), "s3://bucket/prefix");
    }

    #[test]
    fn scrub_removes_known_secrets() {
        assert_eq!(scrub("pw is hunter2!", &["hunter2"]), "pw is ***!");
    }
}
