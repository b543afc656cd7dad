//! Who may do what over HTTP: bearer tokens, each with a role (`reader`, `submitter`, `operator`, each
//! allowed what the one before it is), and [`ROUTES`], the one table naming the role every route
//! needs. One middleware applies the table to every request (see `http.rs`); a route missing from the
//! table is refused to every token, so a new route stays closed until it is given a line here. With no
//! token configured the API is open, as before tokens existed. Tokens are compared as SHA-256 digests
//! in constant time, and never logged.

use ring::digest::{digest, SHA256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What a token allows; each role allows everything the roles before it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read and list orders, watch them, read the diagnostics.
    Reader,
    /// Also submit orders.
    Submitter,
    /// Also cancel and retry orders, and drain the node.
    Operator,
}

impl Role {
    const ALL: [Role; 3] = [Role::Reader, Role::Submitter, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }
}

/// What a request needs before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without a token.
    Open,
    /// A token with this role or a higher one.
    Needs(Role),
    /// Nobody: the route is not in [`ROUTES`].
    Refused,
}

/// The role each route needs: method, route as the router matches it, access. One line per route.
pub const ROUTES: &[(&str, &str, Access)] = &[
    ("GET", "/healthz", Access::Open),
    ("GET", "/readyz", Access::Open),
    ("GET", "/metrics", Access::Open),
    ("GET", "/openapi.json", Access::Open),
    ("GET", "/orders", Access::Needs(Role::Reader)),
    ("GET", "/orders/{id}", Access::Needs(Role::Reader)),
    ("GET", "/orders/{id}/events", Access::Needs(Role::Reader)),
    ("GET", "/diagnostic/heartbeat", Access::Needs(Role::Reader)),
    ("GET", "/diagnostic/cluster", Access::Needs(Role::Reader)),
    ("GET", "/diagnostic/stats", Access::Needs(Role::Reader)),
    ("POST", "/orders", Access::Needs(Role::Submitter)),
    ("POST", "/orders/{id}/cancel", Access::Needs(Role::Operator)),
    ("POST", "/orders/{id}/retry", Access::Needs(Role::Operator)),
    ("POST", "/admin/drain", Access::Needs(Role::Operator)),
];

/// What `method` on `route` (the router's matched path; `None` when no route matched) needs. `HEAD`
/// needs what `GET` does. A request no route matches needs a reader's token, then gets its 404.
pub fn access(method: &str, route: Option<&str>) -> Access {
    let method = if method == "HEAD" { "GET" } else { method };
    let Some(route) = route else {
        return Access::Needs(Role::Reader);
    };
    ROUTES
        .iter()
        .find(|(m, r, _)| *m == method && *r == route)
        .map_or(Access::Refused, |(_, _, access)| *access)
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No `Authorization: Bearer` token, or one that is not configured: 401.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The token's role may not do this: 403.
    #[error("a {role} token may not {method} {path}{}", needs.map_or(String::new(), |r| format!(" (needs {})", r.as_str())))]
    Forbidden {
        role: &'static str,
        method: String,
        path: String,
        needs: Option<Role>,
    },
}

/// The configured tokens and their roles. Empty: the API is open.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Arc<[([u8; 32], Role)]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

/// A token setting that cannot be used; the node does not start.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read the API tokens file {} (ORDERLY_API_TOKENS_FILE): {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API tokens file {} (ORDERLY_API_TOKENS_FILE), line {line}: {reason}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("API tokens file {} (ORDERLY_API_TOKENS_FILE) names no token; write one `token role` per line, or unset it", .0.display())]
    NoToken(PathBuf),
    #[error("--api-token (ORDERLY_API_TOKEN) is empty; set a token or unset it")]
    EmptyToken,
}

impl Tokens {
    /// The tokens of the file at `file` (one `token role` per line) and `operator_token`, if given.
    pub fn load(file: Option<&Path>, operator_token: Option<&str>) -> Result<Tokens, TokensError> {
        let mut tokens = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
                path: path.to_owned(),
                source,
            })?;
            tokens = parse(&text).map_err(|(line, reason)| TokensError::Line {
                path: path.to_owned(),
                line,
                reason,
            })?;
            if tokens.is_empty() {
                return Err(TokensError::NoToken(path.to_owned()));
            }
        }
        if let Some(token) = operator_token {
            if token.trim().is_empty() {
                return Err(TokensError::EmptyToken);
            }
            tokens.push((token.trim().to_owned(), Role::Operator));
        }
        Ok(Tokens::new(&tokens))
    }

    fn new(tokens: &[(String, Role)]) -> Tokens {
        let digests = tokens
            .iter()
            .map(|(token, role)| (sha256(token.as_bytes()), *role))
            .collect();
        Tokens { digests }
    }

    /// Whether no token is configured, and the API is open.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The role of `presented`, if it is a configured token. Every configured token is compared, each
    /// in constant time, whichever matches.
    fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let presented = sha256(presented);
        let mut found = None;
        for (digest, role) in self.digests.iter() {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(*role);
            }
        }
        found
    }

    /// Whether a request for `method` on `route` (see [`access`]) with the `Authorization` header
    /// `authorization` may go on to its handler.
    pub fn check(
        &self,
        method: &str,
        route: Option<&str>,
        path: &str,
        authorization: Option<&[u8]>,
    ) -> Result<(), Denied> {
        let needed = access(method, route);
        if self.is_empty() || needed == Access::Open {
            return Ok(());
        }
        let Some(presented) = authorization.and_then(bearer) else {
            return Err(Denied::Unauthenticated(
                "this endpoint needs an `Authorization: Bearer <token>` header",
            ));
        };
        let Some(role) = self.role_of(presented) else {
            return Err(Denied::Unauthenticated("the bearer token is not valid"));
        };
        match needed {
            Access::Needs(needs) if role >= needs => Ok(()),
            Access::Needs(needs) => Err(forbidden(role, method, path, Some(needs))),
            Access::Refused | Access::Open => Err(forbidden(role, method, path, None)),
        }
    }
}

fn forbidden(role: Role, method: &str, path: &str, needs: Option<Role>) -> Denied {
    Denied::Forbidden {
        role: role.as_str(),
        method: method.to_owned(),
        path: path.to_owned(),
        needs,
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The `token role` lines of a tokens file; `#` starts a comment, blank lines are skipped, and a
/// leading byte order mark (as some editors save UTF-8) is not part of the first token. An error
/// names the line (from 1) and what is wrong with it, never the token.
fn parse(text: &str) -> Result<Vec<(String, Role)>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut tokens: Vec<(String, Role)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let content = line.split('#').next().unwrap_or_default();
        let fields: Vec<&str> = content.split_whitespace().collect();
        let (token, role) = match fields.as_slice() {
            [] => continue,
            [_] => return Err((number, "a token without a role; write `token role` with a role of reader, submitter or operator".into())),
            [token, role] => (*token, *role),
            _ => return Err((number, "more than `token role` on the line (a token has no spaces)".into())),
        };
        let Some(role) = Role::parse(role) else {
            return Err((
                number,
                format!("unknown role {role:?}; the roles are reader, submitter and operator"),
            ));
        };
        if let Some(earlier) = tokens.iter().position(|(t, _)| t == token) {
            return Err((
                number,
                format!("the token of line {} appears again", earlier + 1),
            ));
        }
        tokens.push((token.to_owned(), role));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_the_documented_role() {
        use Access::*;
        use Role::*;
        let expected = [
            ("GET", "/healthz", Open),
            ("GET", "/readyz", Open),
            ("GET", "/metrics", Open),
            ("GET", "/openapi.json", Open),
            ("HEAD", "/healthz", Open),
            ("GET", "/orders", Needs(Reader)),
            ("GET", "/orders/{id}", Needs(Reader)),
            ("HEAD", "/orders/{id}", Needs(Reader)),
            ("GET", "/orders/{id}/events", Needs(Reader)),
            ("GET", "/diagnostic/heartbeat", Needs(Reader)),
            ("GET", "/diagnostic/cluster", Needs(Reader)),
            ("GET", "/diagnostic/stats", Needs(Reader)),
            ("POST", "/orders", Needs(Submitter)),
            ("POST", "/orders/{id}/cancel", Needs(Operator)),
            ("POST", "/orders/{id}/retry", Needs(Operator)),
            ("POST", "/admin/drain", Needs(Operator)),
        ];
        for (method, route, access_needed) in expected {
            assert_eq!(
                access(method, Some(route)),
                access_needed,
                "{method} {route}"
            );
        }
        assert_eq!(ROUTES.len(), 14, "a new route is added to this test too");
    }

    #[test]
    fn a_route_missing_from_the_table_is_refused_and_no_route_needs_a_token() {
        assert_eq!(access("POST", Some("/orders/{id}/delete")), Access::Refused);
        assert_eq!(access("DELETE", Some("/orders/{id}")), Access::Refused);
        assert_eq!(access("POST", Some("/healthz")), Access::Refused);
        assert_eq!(access("GET", None), Access::Needs(Role::Reader));
        let tokens = Tokens::new(&[("op".into(), Role::Operator)]);
        let denied = tokens
            .check(
                "POST",
                Some("/admin/stop"),
                "/admin/stop",
                Some(b"Bearer op"),
            )
            .unwrap_err();
        assert!(matches!(denied, Denied::Forbidden { needs: None, .. }));
        assert!(matches!(
            tokens.check("POST", Some("/admin/stop"), "/admin/stop", None),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn roles_allow_what_the_roles_below_them_allow() {
        let tokens = Tokens::new(&[
            ("r".into(), Role::Reader),
            ("s".into(), Role::Submitter),
            ("o".into(), Role::Operator),
        ]);
        let check = |method, route: &str, token: &str| {
            let header = format!("Bearer {token}");
            tokens.check(method, Some(route), route, Some(header.as_bytes()))
        };
        assert_eq!(check("GET", "/orders/{id}", "r"), Ok(()));
        assert!(matches!(
            check("POST", "/orders", "r"),
            Err(Denied::Forbidden { .. })
        ));
        assert_eq!(check("POST", "/orders", "s"), Ok(()));
        assert!(check("POST", "/admin/drain", "s").is_err());
        assert_eq!(check("POST", "/admin/drain", "o"), Ok(()));
        assert_eq!(check("GET", "/orders/{id}", "o"), Ok(()));
        assert!(matches!(
            check("GET", "/orders/{id}", "x"),
            Err(Denied::Unauthenticated(_))
        ));
        assert_eq!(check("GET", "/healthz", "x"), Ok(()));
        let header = Some(b"bearer  o ".as_slice());
        assert_eq!(
            tokens.check("POST", Some("/admin/drain"), "/admin/drain", header),
            Ok(())
        );
        let basic = Some(b"Basic o".as_slice());
        assert!(tokens.check("GET", Some("/orders"), "/", basic).is_err());
    }

    #[test]
    fn without_tokens_everything_is_open() {
        let open = Tokens::default();
        assert_eq!(
            open.check("POST", Some("/admin/drain"), "/admin/drain", None),
            Ok(())
        );
    }

    #[test]
    fn a_tokens_file_has_one_token_and_role_per_line_with_comments() {
        let text = "# operators\n\nabc operator  # the on-call\n  def reader\nghi submitter\n";
        let tokens = parse(text).unwrap();
        assert_eq!(
            tokens,
            vec![
                ("abc".to_owned(), Role::Operator),
                ("def".to_owned(), Role::Reader),
                ("ghi".to_owned(), Role::Submitter),
            ]
        );
        assert_eq!(parse("abc admin").unwrap_err().0, 1);
        assert!(parse("abc admin").unwrap_err().1.contains("unknown role"));
        assert!(parse("\nabc").unwrap_err().1.contains("without a role"));
        assert_eq!(parse("\nabc").unwrap_err().0, 2);
        assert!(parse("a b c").is_err());
        assert!(parse("a reader\na operator")
            .unwrap_err()
            .1
            .contains("line 1"));
        let secret = parse("s3cret admin").unwrap_err().1;
        assert!(!secret.contains("s3cret"), "{secret}");
    }

    #[test]
    fn a_bad_token_setting_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# nothing yet\n").unwrap();
        assert!(matches!(
            Tokens::load(Some(&path), None),
            Err(TokensError::NoToken(_))
        ));
        std::fs::write(&path, "t1 reader\nt2 boss\n").unwrap();
        let err = Tokens::load(Some(&path), None).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("boss"), "{err}");
        assert!(matches!(
            Tokens::load(None, Some(" ")),
            Err(TokensError::EmptyToken)
        ));
        assert!(matches!(
            Tokens::load(Some(&dir.path().join("missing")), None),
            Err(TokensError::Read { .. })
        ));
        assert!(Tokens::load(None, None).unwrap().is_empty());
        assert_eq!(
            Tokens::load(None, Some("x")).unwrap().role_of(b"x"),
            Some(Role::Operator)
        );
    }
}
