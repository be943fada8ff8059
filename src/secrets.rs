//! Where secrets come from, in one place: a repository's key or passphrase, a database's
//! password, a scratch server's password. Each is read from a file given (mode 0600, see
//! [`crate::keys::read_secret_line`]), an environment variable where the CLI allows one, or a
//! systemd credential (`LoadCredential=`, found in `$CREDENTIALS_DIRECTORY`). Nothing here
//! logs or returns a secret in an error message.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keys::{self, Secret};

/// The systemd credential `name`, if the service has it.
pub fn credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    Some(Path::new(&dir).join(name)).filter(|p| p.exists())
}

/// The systemd credential `name`, which the configuration says is there (`what` names that
/// setting in the error).
pub fn required_credential(name: &str, what: &str) -> Result<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
        Error::invalid(format!(
            "{what} {name:?}: no $CREDENTIALS_DIRECTORY (set LoadCredential= in the unit)"
        ))
    })?;
    Ok(Path::new(&dir).join(name))
}

/// Where to look for a repository's secret, in order: a key file, a password file, a
/// passphrase in an environment variable, then two systemd credentials (a key file and a
/// password).
#[derive(Debug, Default, Clone, Copy)]
pub struct Lookup<'a> {
    pub key_file: Option<&'a Path>,
    pub password_file: Option<&'a Path>,
    /// The variable holding a passphrase (empty counts as unset).
    pub passphrase_var: Option<&'a str>,
    /// The credentials holding a key file and a password.
    pub credentials: Option<(&'a str, &'a str)>,
}

impl Lookup<'_> {
    /// The secret from the first source that is set; `None` when none is.
    pub fn find(&self) -> Result<Option<Secret>> {
        if let Some(p) = self.key_file {
            return Secret::from_key_file(p).map(Some);
        }
        if let Some(p) = self.password_file {
            return Secret::from_password_file(p).map(Some);
        }
        if let Some(var) = self.passphrase_var {
            if let Ok(p) = std::env::var(var) {
                if !p.is_empty() {
                    return Ok(Some(Secret::passphrase(p)));
                }
            }
        }
        if let Some((key, password)) = self.credentials {
            if let Some(p) = credential(key) {
                return Secret::from_key_file(&p).map(Some);
            }
            if let Some(p) = credential(password) {
                return Secret::from_password_file(&p).map(Some);
            }
        }
        Ok(None)
    }
}

/// A database's password: `file`, or else the systemd credential `kluis-db-password` when
/// there is one; none when neither is (the server may trust the connection).
pub fn db_password(file: Option<&Path>) -> Result<Option<Zeroizing<String>>> {
    password(file, "kluis-db-password")
}

/// A drill's scratch server password: `file`, or else the credential `kluis-scratch-password`.
pub fn scratch_password(file: Option<&Path>) -> Result<Option<Zeroizing<String>>> {
    password(file, "kluis-scratch-password")
}

fn password(file: Option<&Path>, credential_name: &str) -> Result<Option<Zeroizing<String>>> {
    let path = match file {
        Some(p) => Some(p.to_path_buf()),
        None => credential(credential_name),
    };
    path.map(|p| keys::read_secret_line(&p)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn private(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn the_first_source_given_wins_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (key, pass) = (dir.path().join("key"), dir.path().join("pass"));
        keys::generate_key_file(&key).unwrap();
        private(&pass, "correct horse\n");
        let both = Lookup {
            key_file: Some(&key),
            password_file: Some(&pass),
            ..Default::default()
        };
        assert!(matches!(both.find().unwrap(), Some(Secret::KeyFile(_))));
        let pass_only = Lookup {
            password_file: Some(&pass),
            ..Default::default()
        };
        match pass_only.find().unwrap() {
            Some(Secret::Passphrase(p)) => assert_eq!(p.as_str(), "correct horse"),
            other => panic!("{other:?}"),
        }
        assert!(Lookup::default().find().unwrap().is_none());
        let missing = dir.path().join("nope");
        let err = Lookup {
            key_file: Some(&missing),
            ..Default::default()
        }
        .find()
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert_eq!(
            db_password(Some(&pass)).unwrap().unwrap().as_str(),
            "correct horse"
        );
    }
}
