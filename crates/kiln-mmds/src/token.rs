//! MMDS V2 session tokens (`PUT /latest/api/token`).
//!
//! A token is stateless: `base64url(expiry_ms ‖ nonce ‖ HMAC-SHA256(key, expiry_ms ‖ nonce))`,
//! where the key is 32 random bytes drawn on first use and `expiry_ms` counts from the
//! authority's creation on the monotonic clock. Validating one needs no table, so a guest that
//! asks for millions of tokens costs no memory; a token is valid until its expiry, for this VM
//! process only.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// Shortest token lifetime a guest may ask for, in seconds.
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
/// Longest token lifetime a guest may ask for (6 hours), in seconds.
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21_600;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 8;
const MAC_LEN: usize = 32;
const RAW_LEN: usize = 8 + NONCE_LEN + MAC_LEN;
/// Longest header value worth decoding (a real token is 64 characters).
const MAX_TOKEN_TEXT: usize = 128;

/// Why a token could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The requested lifetime is outside 1..=21600 seconds.
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}."
    )]
    InvalidTtl(u32),
    /// The host could not supply random bytes for the token key.
    #[error("cannot generate a token: the host's random number generator failed: {0}")]
    Random(String),
}

/// Fills `buf` with random bytes from the kernel.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.to_string());
        }
        done += n as usize;
    }
    Ok(())
}

fn hmac_sha256(key: &[u8; KEY_LEN], msg: &[u8]) -> [u8; MAC_LEN] {
    const BLOCK: usize = 64;
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new().chain_update(ipad).chain_update(msg).finalize();
    Sha256::new().chain_update(opad).chain_update(inner).finalize().into()
}

/// Issues and checks tokens.
#[derive(Debug)]
pub struct TokenAuthority {
    epoch: Instant,
    key: Option<[u8; KEY_LEN]>,
}

impl Default for TokenAuthority {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenAuthority {
    pub fn new() -> Self {
        Self { epoch: Instant::now(), key: None }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// A token valid for `ttl_seconds` from `now`.
    pub fn generate(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        let key = match self.key {
            Some(k) => k,
            None => {
                let mut k = [0u8; KEY_LEN];
                fill_random(&mut k).map_err(TokenError::Random)?;
                self.key = Some(k);
                k
            }
        };
        let expiry = self.millis(now + Duration::from_secs(u64::from(ttl_seconds)));
        let mut raw = [0u8; RAW_LEN];
        raw[..8].copy_from_slice(&expiry.to_le_bytes());
        fill_random(&mut raw[8..8 + NONCE_LEN]).map_err(TokenError::Random)?;
        let mac = hmac_sha256(&key, &raw[..8 + NONCE_LEN]);
        raw[8 + NONCE_LEN..].copy_from_slice(&mac);
        Ok(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Whether `token` was issued here and has not expired at `now`.
    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        let Some(key) = &self.key else { return false };
        if token.len() > MAX_TOKEN_TEXT {
            return false;
        }
        let Ok(raw) = URL_SAFE_NO_PAD.decode(token.trim()) else { return false };
        if raw.len() != RAW_LEN {
            return false;
        }
        let mac = hmac_sha256(key, &raw[..8 + NONCE_LEN]);
        // Constant time: a guest must not learn the MAC byte by byte from timing.
        let diff = mac.iter().zip(&raw[8 + NONCE_LEN..]).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return false;
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&raw[..8]);
        self.millis(now) < u64::from_le_bytes(expiry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_known_answer() {
        // RFC 4231 test case 1 with its 20-byte key zero-padded to 32 bytes gives the same
        // HMAC (keys shorter than the block are zero-padded by definition).
        let mut key = [0u8; KEY_LEN];
        key[..20].copy_from_slice(&[0x0b; 20]);
        let mac = hmac_sha256(&key, b"Hi There");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
    }

    #[test]
    fn tokens_are_valid_until_they_expire() {
        let mut ta = TokenAuthority::new();
        let t0 = Instant::now();
        assert!(!ta.is_valid("anything", t0), "no key yet: nothing is valid");
        let tok = ta.generate(2, t0).unwrap();
        assert!(ta.is_valid(&tok, t0));
        assert!(ta.is_valid(&tok, t0 + Duration::from_millis(1900)));
        assert!(!ta.is_valid(&tok, t0 + Duration::from_secs(3)));
        let other = ta.generate(2, t0).unwrap();
        assert_ne!(tok, other, "tokens carry a nonce");
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let mut ta = TokenAuthority::new();
        let now = Instant::now();
        let tok = ta.generate(60, now).unwrap();
        // Change the expiry without the key.
        let mut raw = URL_SAFE_NO_PAD.decode(&tok).unwrap();
        raw[0] ^= 0xff;
        assert!(!ta.is_valid(&URL_SAFE_NO_PAD.encode(&raw), now));
        // Another authority's token (another VM) is worthless here.
        let mut other = TokenAuthority::new();
        let foreign = other.generate(60, now).unwrap();
        assert!(!ta.is_valid(&foreign, now));
        for bad in ["", "!!!", &"A".repeat(64), &"A".repeat(10_000), &tok[..tok.len() - 1]] {
            assert!(!ta.is_valid(bad, now), "{bad:?}");
        }
    }

    #[test]
    fn ttl_is_bounded() {
        let mut ta = TokenAuthority::new();
        let now = Instant::now();
        assert_eq!(ta.generate(0, now), Err(TokenError::InvalidTtl(0)));
        assert_eq!(ta.generate(21_601, now), Err(TokenError::InvalidTtl(21_601)));
        assert!(ta.generate(1, now).is_ok());
        assert!(ta.generate(21_600, now).is_ok());
        assert_eq!(
            TokenError::InvalidTtl(0).to_string(),
            "Invalid time to live value provided for token: 0. Please provide a value between 1 and 21600."
        );
    }
}
