//! How a node is let into NATS: the servers of `NATS_URL` with their credentials taken out (a user and
//! password, or a token, written in the URL), or a `.creds` file, or an nkey seed, and TLS with a CA of
//! its own and an optional client certificate. A URL is only ever shown with its secret hidden
//! ([`redact`]), and the client is only ever given URLs without one.

use std::fmt;
use std::path::{Path, PathBuf};

/// The prefix of the node's reply subjects. It differs from the `_INBOX` other clients use, so a user
/// allowed to receive its own replies (`_INBOX.>`) cannot receive the node's: work messages fetched
/// from the consumer, and the answers of the JetStream API (see nats/accounts.conf).
pub const INBOX_PREFIX: &str = "_INBOX_orderly";

/// What stands in for a secret where a URL is shown.
const HIDDEN: &str = "***";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("NATS_URL names no server; write it like nats://127.0.0.1:4222, or unset it to start an embedded nats-server")]
    NoUrl,
    #[error("NATS_URL {url:?} is not a NATS URL: {reason}; write it like nats://127.0.0.1:4222 (several servers comma-separated, a user as nats://user:password@host:4222)")]
    Url { url: String, reason: String },
    #[error("the servers in NATS_URL carry different credentials; give the same user and password (or token) to each, or to none")]
    Mixed,
    #[error("set only one way to authenticate to NATS: credentials in NATS_URL, ORDERLY_NATS_CREDS or ORDERLY_NATS_NKEY")]
    Conflict,
    #[error("ORDERLY_NATS_TLS_CERT and ORDERLY_NATS_TLS_KEY go together: set both or neither")]
    HalfClientCertificate,
    #[error("cannot read {what} {path} ({setting})")]
    Read {
        what: &'static str,
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} (ORDERLY_NATS_CREDS) is not a NATS credentials file (a user JWT and an nkey seed)"
    )]
    NotCreds {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The settings a node authenticates with, besides `NATS_URL`.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// A `.creds` file: a user JWT and its nkey seed.
    pub creds: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey: Option<PathBuf>,
    /// The CA that signed the servers' certificates; setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key, for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Who the node says it is.
#[derive(Clone, PartialEq, Eq)]
enum Identity {
    Anonymous,
    User { user: String, password: String },
    Token(String),
    Creds(String),
    Nkey(String),
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Identity::Anonymous => "Anonymous",
            Identity::User { .. } => "User(..)",
            Identity::Token(_) => "Token(..)",
            Identity::Creds(_) => "Creds(..)",
            Identity::Nkey(_) => "Nkey(..)",
        })
    }
}

/// Everything a connection needs to reach and enter NATS.
#[derive(Debug, Clone)]
pub struct Access {
    servers: Vec<async_nats::ServerAddr>,
    shown: String,
    identity: Identity,
    tls_ca: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
}

impl Access {
    /// Reads `urls` (a `NATS_URL`) and the files `settings` name. A file that cannot be read, or two
    /// ways to authenticate at once, is an error here, before the node connects.
    pub fn new(urls: &str, settings: &Settings) -> Result<Access, CredentialsError> {
        let mut servers = Vec::new();
        let mut in_url: Option<Identity> = None;
        for url in urls.split(',').map(str::trim).filter(|url| !url.is_empty()) {
            let (bare, userinfo) = split_userinfo(url);
            let server = parse_server(&bare).map_err(|reason| CredentialsError::Url {
                url: redact(url),
                reason,
            })?;
            let identity = userinfo.map_or(Identity::Anonymous, identity_of);
            match &in_url {
                Some(seen) if *seen != identity => return Err(CredentialsError::Mixed),
                _ => in_url = Some(identity),
            }
            servers.push(server);
        }
        let in_url = in_url.ok_or(CredentialsError::NoUrl)?;
        let identity = match (in_url, &settings.creds, &settings.nkey) {
            (identity, None, None) => identity,
            (Identity::Anonymous, Some(path), None) => Identity::Creds(read_creds(path)?),
            (Identity::Anonymous, None, Some(path)) => Identity::Nkey(
                read("the nkey seed file", "ORDERLY_NATS_NKEY", path)?
                    .trim()
                    .to_owned(),
            ),
            _ => return Err(CredentialsError::Conflict),
        };
        let client_certificate = match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => return Err(CredentialsError::HalfClientCertificate),
        };
        Ok(Access {
            servers,
            shown: redact(urls),
            identity,
            tls_ca: settings.tls_ca.clone(),
            client_certificate,
        })
    }

    /// The servers, without credentials.
    pub fn servers(&self) -> &[async_nats::ServerAddr] {
        &self.servers
    }

    /// `NATS_URL` as it may be shown: with every password and token hidden.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Connection options carrying the node's identity, its TLS settings and its reply prefix.
    pub fn options(&self) -> async_nats::ConnectOptions {
        let options = match &self.identity {
            Identity::Anonymous => async_nats::ConnectOptions::new(),
            Identity::User { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Identity::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            Identity::Nkey(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
            // Checked when the file was read; were it not valid now, the server would refuse the node.
            Identity::Creds(creds) => async_nats::ConnectOptions::new()
                .credentials(creds)
                .unwrap_or_else(|_| async_nats::ConnectOptions::new()),
        };
        let options = options.custom_inbox_prefix(INBOX_PREFIX);
        let options = match &self.tls_ca {
            Some(ca) => options.add_root_certificates(ca.clone()).require_tls(true),
            None => options,
        };
        match &self.client_certificate {
            Some((cert, key)) => options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true),
            None => options,
        }
    }
}

/// One server of `NATS_URL` (without its user information), checked for the form of a NATS URL before
/// anything connects: a scheme the client speaks, a host, a port, and nothing after them. A typo such as
/// `htp:/oops` would otherwise be taken for a host name and looked up for ever.
fn parse_server(bare: &str) -> Result<async_nats::ServerAddr, String> {
    const SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];
    match bare.split_once("://") {
        Some((scheme, _)) if !SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) => {
            return Err(format!(
                "unknown scheme {scheme:?} (use nats://, tls://, ws:// or wss://)"
            ));
        }
        Some(_) => {}
        None if bare.contains('/') => {
            return Err("a URL starts with nats:// (or tls://, ws://, wss://)".into());
        }
        None => {}
    }
    let server = bare
        .parse::<async_nats::ServerAddr>()
        .map_err(|e| e.to_string())?;
    let url = server.clone().into_inner();
    if url.host_str().is_none_or(str::is_empty) {
        return Err("it names no host".into());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("nothing may follow the host and port".into());
    }
    Ok(server)
}

/// `urls` (one URL or several, comma-separated) with the password or token of each hidden; the user
/// name stays, so the log still says who the node connects as.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let (bare, userinfo) = split_userinfo(url);
            let Some(userinfo) = userinfo else {
                return url.to_owned();
            };
            let hidden = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{HIDDEN}"),
                None => HIDDEN.to_owned(),
            };
            match bare.split_once("://") {
                Some((scheme, rest)) => format!("{scheme}://{hidden}@{rest}"),
                None => {
                    let start = bare.len() - bare.trim_start().len();
                    format!("{}{hidden}@{}", &bare[..start], &bare[start..])
                }
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A URL without its user information, and that information (`user:password` or a token).
fn split_userinfo(url: &str) -> (String, Option<&str>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => (format!("{scheme}{}", &rest[at + 1..]), Some(&rest[..at])),
        None => (url.to_owned(), None),
    }
}

/// `user:password` is a user and password, anything else a token; both may be percent-encoded.
fn identity_of(userinfo: &str) -> Identity {
    match userinfo.split_once(':') {
        Some((user, password)) => Identity::User {
            user: percent_decode(user),
            password: percent_decode(password),
        },
        None => Identity::Token(percent_decode(userinfo)),
    }
}

/// Decodes `%XX` escapes; anything that is not a valid escape stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read(
    what: &'static str,
    setting: &'static str,
    path: &Path,
) -> Result<String, CredentialsError> {
    std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        what,
        setting,
        path: path.to_owned(),
        source,
    })
}

/// The contents of a `.creds` file, checked to hold a JWT and a seed.
fn read_creds(path: &Path) -> Result<String, CredentialsError> {
    let creds = read("the credentials file", "ORDERLY_NATS_CREDS", path)?;
    async_nats::ConnectOptions::new()
        .credentials(&creds)
        .map_err(|source| CredentialsError::NotCreds {
            path: path.to_owned(),
            source,
        })?;
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_url_is_refused_before_connecting() {
        for bad in [
            "htp:/oops",
            "htp://host:4222",
            "nats://",
            "nats://host:4222/path",
            "nats://host:port",
        ] {
            let err = Access::new(bad, &Settings::default()).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("NATS_URL") && text.contains("nats://127.0.0.1:4222"),
                "{bad}: {text}"
            );
        }
        for good in [
            "nats://127.0.0.1:4222",
            "localhost:4222",
            "tls://a:4222,nats://b",
            "ws://a:8080",
        ] {
            assert!(Access::new(good, &Settings::default()).is_ok(), "{good}");
        }
    }

    #[test]
    fn secrets_in_urls_are_hidden_wherever_a_url_is_shown() {
        assert_eq!(
            redact("nats://node:s3cr%40t@a:4222, tls://tok3n@b:4222,nats://c:4222"),
            "nats://node:***@a:4222, tls://***@b:4222,nats://c:4222"
        );
        assert_eq!(redact("node:pw@localhost:4222"), "node:***@localhost:4222");
        assert_eq!(redact("nats://a:4222/x@y"), "nats://a:4222/x@y");
        let err = Access::new("nats://node:s3cret@[::1", &Settings::default()).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let access = Access::new("nats://node:s3cret@a:4222", &Settings::default()).unwrap();
        assert!(!format!("{access:?}").contains("s3cret"));
        assert_eq!(access.shown(), "nats://node:***@a:4222");
    }

    #[test]
    fn credentials_come_out_of_the_url_and_the_client_gets_bare_servers() {
        let access = Access::new(
            "nats://node:s3cr%40t@a:4222,nats://node:s3cr%40t@b:4222",
            &Settings::default(),
        )
        .unwrap();
        assert_eq!(
            access.identity,
            Identity::User {
                user: "node".into(),
                password: "s3cr@t".into()
            }
        );
        for server in access.servers() {
            assert!(!server.has_user_pass(), "{server:?}");
        }
        let token = Access::new("tok3n@a:4222", &Settings::default()).unwrap();
        assert_eq!(token.identity, Identity::Token("tok3n".into()));
        let none = Access::new("nats://a:4222", &Settings::default()).unwrap();
        assert_eq!(none.identity, Identity::Anonymous);
    }

    #[test]
    fn nats_url_takes_every_server_of_a_cluster() {
        let access = Access::new(
            "nats://a:4222, nats://b:4222,nats://c:4222",
            &Settings::default(),
        )
        .expect("valid");
        let hosts: Vec<&str> = access.servers().iter().map(|s| s.host()).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        let bad = Access::new("nats://a:4222,http://[::1", &Settings::default());
        assert!(matches!(bad, Err(CredentialsError::Url { .. })));
    }

    #[test]
    fn contradictory_settings_are_refused_before_connecting() {
        let mixed = Access::new("nats://u:p@a:4222,nats://b:4222", &Settings::default());
        assert!(matches!(mixed, Err(CredentialsError::Mixed)));
        let both = Settings {
            nkey: Some("/nonexistent".into()),
            ..Settings::default()
        };
        let conflict = Access::new("nats://u:p@a:4222", &both);
        assert!(matches!(conflict, Err(CredentialsError::Conflict)));
        let missing = Access::new("nats://a:4222", &both).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent"), "{missing}");
        let half = Settings {
            tls_cert: Some("c.pem".into()),
            ..Settings::default()
        };
        let half = Access::new("nats://a:4222", &half);
        assert!(matches!(half, Err(CredentialsError::HalfClientCertificate)));
        assert!(matches!(
            Access::new(" , ", &Settings::default()),
            Err(CredentialsError::NoUrl)
        ));
    }

    #[test]
    fn a_file_that_is_not_a_creds_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.creds");
        std::fs::write(&path, "not a creds file").unwrap();
        let settings = Settings {
            creds: Some(path),
            ..Settings::default()
        };
        let err = Access::new("nats://a:4222", &settings).unwrap_err();
        assert!(matches!(err, CredentialsError::NotCreds { .. }), "{err}");
    }
}
