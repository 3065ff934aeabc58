//! SRTP protection of outgoing RTP in the SFU's own code, for the direct send path.
//!
//! str0m seals what goes through its send path (queue, pacer, per-packet history);
//! the direct path builds the header itself and seals here, with the same session
//! keys derived from the DTLS-SRTP export (RFC 5764 §4.2 layout, RFC 3711 §4.3 key
//! derivation), as AES-GCM (RFC 7714) or AES-CM with HMAC-SHA1-80 (RFC 3711).
//! Key derivation and AES-CM use str0m's crypto provider; AES-GCM seals with
//! aws-lc (the library behind that provider) directly, out of place: str0m's
//! cipher interface copies the payload into the output and seals there, a second
//! pass over every byte per packet per viewer.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use str0m::config::CryptoProvider;
use str0m::crypto::dtls::SrtpProfile;
use str0m::crypto::{
    AeadAes128Gcm, Aes128CmSha1_80, Aes128CmSha1_80Cipher, Sha1HmacProvider, SrtpProvider,
};

/// RFC 3711 key-derivation labels for SRTP (not SRTCP: the direct path sends no RTCP).
const LABEL_RTP_ENCRYPTION: u8 = 0;
const LABEL_RTP_AUTH: u8 = 1;
const LABEL_RTP_SALT: u8 = 2;

/// What the DTLS handshake exported, as the SFU keeps it for the direct path.
#[derive(Clone)]
pub struct Exported {
    /// client key | server key | client salt | server salt.
    pub material: Vec<u8>,
    /// Negotiated protection profile.
    pub profile: SrtpProfile,
    /// We were the DTLS client: our send keys are the client's.
    pub active: bool,
}

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Exported")
            .field("profile", &self.profile)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

enum Cipher {
    /// AES-128-GCM or AES-256-GCM (the key says which).
    Gcm { salt: [u8; 12], key: LessSafeKey },
    CmSha1 {
        salt: [u8; 14],
        auth: [u8; 20],
        enc: Box<dyn Aes128CmSha1_80Cipher>,
        hmac: &'static dyn Sha1HmacProvider,
    },
}

/// Seals RTP packets for one SRTP session in the sending direction.
pub struct SrtpSealer {
    cipher: Cipher,
}

impl std::fmt::Debug for SrtpSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SrtpSealer")
    }
}

/// Our (master key, master salt) out of the exported material.
fn master<const ML: usize, const SL: usize>(e: &Exported) -> Option<([u8; ML], [u8; SL])> {
    if e.material.len() != 2 * ML + 2 * SL {
        return None;
    }
    let (ko, so) = if e.active { (0, 0) } else { (ML, SL) };
    let mut key = [0; ML];
    let mut salt = [0; SL];
    key.copy_from_slice(e.material.get(ko..ko + ML)?);
    salt.copy_from_slice(e.material.get(2 * ML + so..2 * ML + so + SL)?);
    Some((key, salt))
}

/// RFC 3711 §4.3.1 with key derivation rate 0: AES-CM keystream under the master
/// key, IV = (master salt XOR label << 48) << 16.
fn derive(p: &dyn SrtpProvider, master_key: &[u8], master_salt: &[u8], label: u8, out: &mut [u8]) {
    let mut input = [0u8; 16];
    let n = master_salt.len().min(14);
    input[..n].copy_from_slice(&master_salt[..n]);
    input[7] ^= label;
    let mut block = [0u8; 32];
    for (round, chunk) in out.chunks_mut(16).enumerate() {
        input[14..].copy_from_slice(&(round as u16).to_be_bytes());
        if master_key.len() == 32 {
            p.srtp_aes_256_ecb_round(master_key, &input, &mut block);
        } else {
            p.srtp_aes_128_ecb_round(master_key, &input, &mut block);
        }
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// Our RTP session encryption key and salt (key and master key are the same length).
fn session_keys<const ML: usize, const SL: usize>(
    srtp: &dyn SrtpProvider,
    e: &Exported,
) -> Option<([u8; ML], [u8; SL])> {
    let (mk, ms) = master::<ML, SL>(e)?;
    let mut key = [0u8; ML];
    let mut salt = [0u8; SL];
    derive(srtp, &mk, &ms, LABEL_RTP_ENCRYPTION, &mut key);
    derive(srtp, &mk, &ms, LABEL_RTP_SALT, &mut salt);
    Some((key, salt))
}

impl SrtpSealer {
    /// Session keys for our sending direction; None if the material does not fit
    /// the profile (or the profile is one this code does not know).
    pub fn new(provider: &CryptoProvider, e: &Exported) -> Option<Self> {
        let srtp = provider.srtp_provider;
        let cipher = match e.profile {
            SrtpProfile::AEAD_AES_128_GCM => {
                let (key, salt) = session_keys::<16, 12>(srtp, e)?;
                Cipher::Gcm {
                    salt,
                    key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).ok()?),
                }
            }
            SrtpProfile::AEAD_AES_256_GCM => {
                let (key, salt) = session_keys::<32, 12>(srtp, e)?;
                Cipher::Gcm {
                    salt,
                    key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).ok()?),
                }
            }
            SrtpProfile::AES128_CM_SHA1_80 => {
                let (key, salt) = session_keys::<16, 14>(srtp, e)?;
                let (mk, ms) = master::<16, 14>(e)?;
                let mut auth = [0u8; 20];
                derive(srtp, &mk, &ms, LABEL_RTP_AUTH, &mut auth);
                Cipher::CmSha1 {
                    salt,
                    auth,
                    enc: srtp.aes_128_cm_sha1_80().create_cipher(key, true),
                    hmac: provider.sha1_hmac_provider,
                }
            }
            _ => return None,
        };
        Some(SrtpSealer { cipher })
    }

    /// Bytes the seal adds after the payload.
    pub fn overhead(&self) -> usize {
        match self.cipher {
            Cipher::Gcm { .. } => AeadAes128Gcm::TAG_LEN,
            Cipher::CmSha1 { .. } => Aes128CmSha1_80::HMAC_TAG_LEN,
        }
    }

    /// Seals one packet: `out` holds the plain RTP header (`out.len()` bytes, at
    /// least 12); the encrypted `payload` and the tag are appended. `index` is the
    /// packet's SRTP index (ROC << 16 | sequence number). False if the cipher failed,
    /// with `out` left holding the header only. (The tests' reference for
    /// [`SrtpSealer::seal_into`], which the send path uses.)
    #[cfg(test)]
    pub fn seal(&mut self, out: &mut Vec<u8>, payload: &[u8], ssrc: u32, index: u64) -> bool {
        let hdr = out.len();
        out.resize(hdr + payload.len() + self.overhead(), 0);
        let ok = self.seal_into(out, hdr, payload, ssrc, index);
        if !ok {
            out.truncate(hdr);
        }
        ok
    }

    /// Seals one packet into `out`, sized by the caller to exactly `hdr` header
    /// bytes, the payload and [`SrtpSealer::overhead`]: the header is read from
    /// `out[..hdr]`, and every byte after it is written (a reused buffer's old
    /// contents never reach the wire). False if the sizes do not add up or the
    /// cipher failed.
    pub fn seal_into(
        &mut self,
        out: &mut [u8],
        hdr: usize,
        payload: &[u8],
        ssrc: u32,
        index: u64,
    ) -> bool {
        let len = payload.len();
        if hdr < 12 || out.len() != hdr + len + self.overhead() {
            return false;
        }
        let seq = index as u16;
        let roc = (index >> 16) as u32;
        match &mut self.cipher {
            Cipher::Gcm { salt, key } => {
                // RFC 7714 §8.1: the IV is the same for both key sizes.
                let iv = AeadAes128Gcm::rtp_iv(*salt, ssrc, roc, seq);
                let (aad, body) = out.split_at_mut(hdr);
                let (ct, tag) = body.split_at_mut(len);
                key.seal_out_of_place_scatter(
                    Nonce::assume_unique_for_key(iv),
                    Aad::from(&*aad),
                    payload,
                    ct,
                    &[],
                    tag,
                )
                .is_ok()
            }
            Cipher::CmSha1 {
                salt,
                auth,
                enc,
                hmac,
            } => {
                let iv = Aes128CmSha1_80::rtp_iv(*salt, ssrc, index);
                let ok = enc.encrypt(&iv, payload, &mut out[hdr..hdr + len]).is_ok();
                if ok {
                    Aes128CmSha1_80::rtp_hmac(
                        |k, parts| hmac.sha1_hmac(k, parts),
                        auth,
                        out,
                        index,
                        hdr + len,
                    );
                }
                ok
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> CryptoProvider {
        str0m::crypto::from_feature_flags()
    }

    /// RFC 3711 appendix B.3 key derivation test vectors (AES-128).
    #[test]
    fn key_derivation_matches_rfc3711_vectors() {
        let p = provider();
        let key = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let salt = hex("0EC675AD498AFEEBB6960B3AABE6");
        let mut enc = [0u8; 16];
        derive(p.srtp_provider, &key, &salt, LABEL_RTP_ENCRYPTION, &mut enc);
        assert_eq!(enc.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut s = [0u8; 14];
        derive(p.srtp_provider, &key, &salt, LABEL_RTP_SALT, &mut s);
        assert_eq!(s.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        let mut auth = [0u8; 20];
        derive(p.srtp_provider, &key, &salt, LABEL_RTP_AUTH, &mut auth);
        assert_eq!(
            auth.to_vec(),
            hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")
        );
    }

    #[test]
    fn wrong_material_length_is_refused() {
        let e = Exported {
            material: vec![0; 10],
            profile: SrtpProfile::AEAD_AES_128_GCM,
            active: true,
        };
        assert!(SrtpSealer::new(&provider(), &e).is_none());
    }

    #[test]
    fn seal_appends_tag_and_keeps_header() {
        for profile in [
            SrtpProfile::AEAD_AES_128_GCM,
            SrtpProfile::AEAD_AES_256_GCM,
            SrtpProfile::AES128_CM_SHA1_80,
        ] {
            let (ml, sl) = match profile {
                SrtpProfile::AEAD_AES_128_GCM => (16, 12),
                SrtpProfile::AEAD_AES_256_GCM => (32, 12),
                _ => (16, 14),
            };
            let e = Exported {
                material: (0..(2 * ml + 2 * sl) as u8).collect(),
                profile,
                active: false,
            };
            let mut s = SrtpSealer::new(&provider(), &e).expect("sealer");
            let header = [0x80u8, 96, 0, 7, 0, 0, 0, 1, 0, 0, 0, 9];
            let mut out = header.to_vec();
            assert!(s.seal(&mut out, b"payload bytes", 9, 7));
            assert_eq!(&out[..12], &header);
            assert_eq!(out.len(), 12 + 13 + s.overhead());
            assert_ne!(&out[12..25], b"payload bytes");
            let mut again = header.to_vec();
            assert!(s.seal(&mut again, b"payload bytes", 9, 7));
            assert_eq!(out, again, "same index, same bytes: a resend is identical");
            assert!(
                !s.seal(&mut vec![0x80; 4], b"x", 9, 8),
                "short header refused"
            );
        }
    }

    /// The GCM seal (aws-lc, out of place) gives the bytes str0m's own cipher
    /// gives, for both key sizes, across a rollover of the sequence number.
    #[test]
    fn gcm_seal_matches_str0m_cipher() {
        use str0m::crypto::AeadAes256Gcm;
        let p = provider();
        let payload: Vec<u8> = (0..1200u32).map(|i| (i * 7) as u8).collect();
        for (profile, ml) in [
            (SrtpProfile::AEAD_AES_128_GCM, 16),
            (SrtpProfile::AEAD_AES_256_GCM, 32),
        ] {
            let e = Exported {
                material: (0..(2 * ml + 24) as u8)
                    .map(|b| b.wrapping_mul(31))
                    .collect(),
                profile,
                active: true,
            };
            let mut s = SrtpSealer::new(&p, &e).expect("sealer");
            for index in [7u64, 65_535, 65_536 + 3] {
                let (seq, roc) = (index as u16, (index >> 16) as u32);
                let mut header = vec![0x80u8, 96, 0, 0, 0, 0, 0, 1, 0, 0, 0x30, 0x39];
                header[2..4].copy_from_slice(&seq.to_be_bytes());
                let mut ours = header.clone();
                assert!(s.seal(&mut ours, &payload, 0x3039, index));
                let mut theirs = vec![0u8; payload.len() + 16];
                let ok = if ml == 16 {
                    let (key, salt) = session_keys::<16, 12>(p.srtp_provider, &e).expect("keys");
                    let iv = AeadAes128Gcm::rtp_iv(salt, 0x3039, roc, seq);
                    p.srtp_provider
                        .aead_aes_128_gcm()
                        .create_cipher(key, true)
                        .encrypt(&iv, &header, &payload, &mut theirs)
                } else {
                    let (key, salt) = session_keys::<32, 12>(p.srtp_provider, &e).expect("keys");
                    let iv = AeadAes256Gcm::rtp_iv(salt, 0x3039, roc, seq);
                    p.srtp_provider
                        .aead_aes_256_gcm()
                        .create_cipher(key, true)
                        .encrypt(&iv, &header, &payload, &mut theirs)
                };
                assert!(ok.is_ok());
                assert_eq!(&ours[..12], &header[..]);
                assert_eq!(&ours[12..], &theirs[..], "{profile:?} index {index}");
            }
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }
}
