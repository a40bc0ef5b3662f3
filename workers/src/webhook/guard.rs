//! Where the webhook worker may connect: no request to the worker's own network unless the
//! configuration allows it (server-side request forgery is the risk: a task's URL comes from
//! a definition anyone with write access to a project can change).
//!
//! Refused by default: loopback, unspecified, link-local, private (RFC 1918, shared 100.64/10,
//! ULA fc00::/7, site-local fec0::/10), multicast, broadcast and reserved ranges, and the same
//! IPv4 ranges inside IPv4-mapped, NAT64 and 6to4 IPv6 addresses. A name is refused if ANY of
//! its addresses is refused, since the connector may pick any of them.
//!
//! The check runs twice: [`Guard::check`] before the request (for a clear error, and for IP
//! literals, which never reach a resolver), and [`GuardedResolver`] as the client's only
//! resolver, so the addresses actually connected to are exactly the checked ones even when a
//! name re-resolves differently (DNS rebinding). The client follows no redirects and ignores
//! proxy variables, so no other path leads elsewhere.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a target was refused or could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The host is, or resolves to, an address the policy refuses.
    #[error("refused target {host}: {addr} is {reason} (allow it with allow_private or allowed_hosts)")]
    Forbidden {
        /// The host as written in the URL.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// Which range it is in.
        reason: &'static str,
    },
    /// The name did not resolve, or resolved to nothing.
    #[error("could not resolve {host}: {message}")]
    Resolve {
        /// The host name.
        host: String,
        /// What the resolver said.
        message: String,
    },
    /// Only http and https URLs with a host are called (the scheme given).
    #[error("unsupported URL scheme {0:?}: only http and https URLs with a host are called")]
    Scheme(String),
}

/// The connection policy: allow private targets wholesale, or by host name.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow_private: bool,
    allowed_hosts: BTreeSet<String>,
}

impl Guard {
    /// A policy; `allowed_hosts` are names or IP literals, compared case-insensitively.
    pub fn new(allow_private: bool, allowed_hosts: &[String]) -> Self {
        let allowed_hosts = allowed_hosts.iter().map(|h| normalize(h)).collect();
        Guard { allow_private, allowed_hosts }
    }

    fn exempt(&self, host: &str) -> bool {
        self.allow_private || self.allowed_hosts.contains(&normalize(host))
    }

    /// Checks a URL's scheme and every address its host resolves to.
    pub async fn check(&self, url: &Url) -> Result<(), GuardError> {
        let host = match (url.scheme(), url.host_str()) {
            ("http" | "https", Some(host)) if !host.is_empty() => host,
            // Only the scheme is kept: the rest of a URL may hold a secret.
            _ => return Err(GuardError::Scheme(url.scheme().to_string())),
        };
        if self.exempt(host) {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = resolve(host, port).await?;
        self.vet(host, addrs.iter().map(SocketAddr::ip))
    }

    fn vet(&self, host: &str, addrs: impl Iterator<Item = IpAddr>) -> Result<(), GuardError> {
        for addr in addrs {
            if let Some(reason) = forbidden(addr) {
                return Err(GuardError::Forbidden { host: host.to_string(), addr, reason });
            }
        }
        Ok(())
    }
}

/// The client's resolver: resolves with the system resolver and returns the addresses only if
/// every one passes the [`Guard`].
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<Guard>,
}

impl GuardedResolver {
    /// A resolver enforcing `guard`.
    pub fn new(guard: Arc<Guard>) -> Self {
        GuardedResolver { guard }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            let host = name.as_str().to_string();
            // The connector puts the URL's port on the addresses; 0 is only a placeholder.
            let addrs = resolve(&host, 0).await?;
            if !guard.exempt(&host) {
                guard.vet(&host, addrs.iter().map(SocketAddr::ip))?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| GuardError::Resolve { host: host.to_string(), message: e.to_string() })?
        .collect();
    if addrs.is_empty() {
        return Err(GuardError::Resolve { host: host.to_string(), message: "no addresses".into() });
    }
    Ok(addrs)
}

fn normalize(host: &str) -> String {
    host.trim().trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

/// The range an address is in if the policy refuses it by default.
pub fn forbidden(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "unspecified (0.0.0.0/8)",
        (127, ..) => "loopback",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "private (RFC 1918)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (169, 254, _) => "link-local",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address a gateway will reach.
    let embedded = match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some((hi, lo)),
        [0x2002, hi, lo, ..] => Some((hi, lo)),
        _ => None,
    };
    if let Some((hi, lo)) = embedded {
        let v4 = Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
        return forbidden_v4(v4);
    }
    match s[0] {
        0xfc00..=0xfdff => Some("unique local (fc00::/7)"),
        0xfe80..=0xfebf => Some("link-local (fe80::/10)"),
        0xfec0..=0xfeff => Some("site-local (fec0::/10)"),
        0xff00..=0xffff => Some("multicast"),
        // The rest of ::/8 (IPv4-compatible and other reserved forms) is never a public host.
        0x0000..=0x00ff => Some("reserved (::/8)"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_internal_ranges_and_admits_public_ones() {
        for refused in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(forbidden(ip).is_some(), "{refused} must be refused");
        }
        for admitted in ["93.184.216.34", "172.32.0.1", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            let ip: IpAddr = admitted.parse().unwrap();
            assert_eq!(forbidden(ip), None, "{admitted} must be admitted");
        }
    }

    #[tokio::test]
    async fn checks_literals_names_and_schemes() {
        let guard = Guard::default();
        for url in ["http://127.0.0.1:8080/x", "http://10.0.0.5/", "http://169.254.169.254/latest", "http://[::1]/"] {
            let err = guard.check(&Url::parse(url).unwrap()).await.unwrap_err();
            assert!(matches!(err, GuardError::Forbidden { .. }), "{url}: {err}");
        }
        // `localhost` resolves to loopback addresses only: refused by resolution, not by name.
        let err = guard.check(&Url::parse("http://localhost:9/").unwrap()).await.unwrap_err();
        assert!(matches!(err, GuardError::Forbidden { ref host, .. } if host == "localhost"), "{err}");
        let err = guard.check(&Url::parse("file:///etc/passwd").unwrap()).await.unwrap_err();
        assert!(matches!(err, GuardError::Scheme(_)));
    }

    #[tokio::test]
    async fn allowed_hosts_and_allow_private_exempt_targets() {
        let by_name = Guard::new(false, &["LOCALHOST".into(), "[::1]".into()]);
        by_name.check(&Url::parse("http://localhost:9/").unwrap()).await.unwrap();
        by_name.check(&Url::parse("http://[::1]:9/").unwrap()).await.unwrap();
        assert!(by_name.check(&Url::parse("http://127.0.0.1:9/").unwrap()).await.is_err());
        Guard::new(true, &[]).check(&Url::parse("http://10.0.0.5/").unwrap()).await.unwrap();
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_with_any_internal_address() {
        let resolver = GuardedResolver::new(Arc::new(Guard::default()));
        let err = resolver.resolve("localhost".parse().unwrap()).await.err().unwrap();
        assert!(err.downcast_ref::<GuardError>().is_some(), "{err}");
        let allowed = GuardedResolver::new(Arc::new(Guard::new(false, &["localhost".into()])));
        let addrs: Vec<SocketAddr> = allowed.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
