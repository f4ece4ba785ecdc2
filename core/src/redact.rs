//! Redaction of secrets in text that may reach a log line, an error or a terminal.
//!
//! Redaction happens before any parsing: a URL that does not parse (an unencoded `#`, `/` or
//! `?` in its password) is still redacted, because everything from `://` to the LAST `@` of
//! the token is taken as userinfo, whatever it contains.

use url::Url;

/// Characters that end a URL token in running text.
fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>')
}

/// Replaces the password of every `scheme://user:password@host` URL in `text` with `***`,
/// and every `password=` parameter's value.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let start = scheme_start(rest, pos);
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail.find(ends_token).unwrap_or(tail.len());
        out.push_str(&redact_token(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    redact_password_params(&out)
}

/// True when `text` holds a URL password or a `password=` parameter.
pub fn has_password(text: &str) -> bool {
    redact_urls(text) != text || text.contains("password=")
}

/// Where the scheme before the `://` at `pos` starts (letters, digits, `+`, `-`, `.`).
fn scheme_start(text: &str, pos: usize) -> usize {
    text[..pos]
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        .last()
        .map_or(pos, |(i, _)| i)
}

/// Redacts one `scheme://...` token.
fn redact_token(token: &str) -> String {
    let Some(sep) = token.find("://") else {
        return token.to_string();
    };
    let after = &token[sep + 3..];
    let Some(at) = after.rfind('@') else {
        return redact_bare_authority(token, sep);
    };
    let userinfo = &after[..at];
    let Some(colon) = userinfo.find(':') else {
        return token.to_string();
    };
    // Parse only what is left once the password is out, so the parser never sees it.
    let user = &userinfo[..colon];
    let candidate = format!("{}://{user}@{}", &token[..sep], &after[at + 1..]);
    if let Ok(mut url) = Url::parse(&candidate) {
        if url.username() == user && url.set_password(Some("***")).is_ok() {
            return url.to_string();
        }
    }
    format!("{}://{user}:***@{}", &token[..sep], &after[at + 1..])
}

/// `scheme://user:pa` with no `@` in the token: what follows the colon is not a port (not
/// all digits), so it is the start of a password cut off by a space or quote.
fn redact_bare_authority(token: &str, sep: usize) -> String {
    let after = &token[sep + 3..];
    if after.starts_with('[') {
        return token.to_string();
    }
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let Some(colon) = after[..authority_end].find(':') else {
        return token.to_string();
    };
    let port_end = after[colon + 1..]
        .find(['/', '?'])
        .map_or(after.len(), |i| colon + 1 + i);
    let port = &after[colon + 1..port_end];
    if port.chars().all(|c| c.is_ascii_digit()) {
        return token.to_string();
    }
    format!("{}{}:***", &token[..sep + 3], &after[..colon])
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
            .find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'' || c == '`')
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
        assert_eq!(
            redact_urls("postgres://db:5432/app"),
            "postgres://db:5432/app"
        );
        assert_eq!(
            redact_urls("postgres://[::1]:5432/app"),
            "postgres://[::1]:5432/app"
        );
    }

    #[test]
    fn passwords_that_break_url_parsing_are_hidden() {
        // An unencoded `#`, `/` or `?` ends the authority for a URL parser.
        for (text, password) in [
            ("postgres://app:pa#ss/w@db/app", "pa#ss/w"),
            ("postgres://app:pa/ss@db/app", "pa/ss"),
            ("postgres://app:5432/ss@db/app", "5432/ss"),
            ("postgres://app:12#34@db/app", "12#34"),
            ("postgres://app:p?x=1@db/app", "p?x=1"),
            ("s3://AKIAEXAMPLE:wJalr/Xy@bucket/prefix", "wJalr/Xy"),
        ] {
            let said = redact_urls(&format!("invalid database url `{text}`: expected ..."));
            assert!(!said.contains(password), "{said}");
            assert!(said.contains(":***@"), "{said}");
            assert!(has_password(text), "{text}");
        }
        assert_eq!(
            redact_urls("url `postgres://app:pa#ss/w@db/app` is bad"),
            "url `postgres://app:***@db/app` is bad"
        );
    }

    #[test]
    fn a_password_cut_off_by_a_space_is_hidden() {
        let said = redact_urls("postgres://app:secret word@db/app");
        assert!(!said.contains("secret"), "{said}");
    }

    #[test]
    fn redaction_is_idempotent_and_leaves_plain_urls_alone() {
        let once = redact_urls("postgres://app:pa#ss@db/app?password=x");
        assert_eq!(redact_urls(&once), once);
        assert!(!has_password("postgres://app@db/app?sslmode=require"));
        assert!(has_password("postgres://app@db/app?password=x"));
        assert!(has_password("postgres://app:x@db/app"));
    }

    #[test]
    fn scrub_removes_known_secrets() {
        assert_eq!(scrub("pw is hunter2!", &["hunter2"]), "pw is ***!");
    }
}
