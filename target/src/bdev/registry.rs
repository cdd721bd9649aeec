//! The set of bdevs the target knows, by unique name (SPDK's bdev list).

use std::fmt;
use std::sync::Arc;

use super::iostat::{BdevIoStats, CountedBdev};
use super::Bdev;

/// Longest bdev name accepted (SPDK does not limit it; a bound keeps replies and logs sane).
pub const MAX_NAME_LEN: usize = 255;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// A bdev with that name (or UUID alias) exists.
    #[error("a bdev named {0} already exists")]
    Exists(String),
    /// No bdev with that name.
    #[error("no bdev named {0}")]
    NotFound(String),
    /// The bdev is claimed by another bdev stacked on it.
    #[error("bdev {name} is claimed by bdev {by}")]
    Claimed {
        /// The claimed bdev.
        name: String,
        /// The bdev that claims it.
        by: String,
    },
    /// The name cannot be used.
    #[error("invalid bdev name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
}

/// Called once when a bdev leaves the registry, so its module refuses new I/O.
pub type OnRemove = Box<dyn FnOnce() + Send>;

struct Entry {
    /// A [`CountedBdev`] around the module's bdev.
    bdev: Arc<dyn Bdev>,
    /// Its I/O statistics.
    stats: Arc<BdevIoStats>,
    /// The module that created it.
    owner: &'static str,
    uuid_alias: String,
    on_remove: Option<OnRemove>,
    /// The bdev stacked on this one that claimed it (SPDK's module claim, exclusive write).
    claimed_by: Option<String>,
}

/// Bdevs in creation order (the order `bdev_get_bdevs` lists them in, as SPDK does).
#[derive(Default)]
pub struct BdevRegistry {
    entries: Vec<Entry>,
}

impl fmt::Debug for BdevRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| e.bdev.name()))
            .finish()
    }
}

/// Formats a UUID the way SPDK prints it (lower-case, hyphenated).
pub fn uuid_string(uuid: [u8; 16]) -> String {
    uuid::Uuid::from_bytes(uuid).hyphenated().to_string()
}

/// Checks that `name` can name a bdev.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let invalid = |reason| RegistryError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("it is longer than 255 bytes"));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("it contains whitespace or control characters"));
    }
    Ok(())
}

impl BdevRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.bdev.name() == name || e.uuid_alias == name)
    }

    /// Adds `bdev`, owned by the module it names ([`Bdev::module_name`]); `on_remove` runs when
    /// it is removed.
    pub fn insert(
        &mut self,
        bdev: Arc<dyn Bdev>,
        on_remove: OnRemove,
    ) -> Result<(), RegistryError> {
        let owner = bdev.module_name();
        self.insert_for(owner, bdev, on_remove)
    }

    /// Adds `bdev`, created by module `owner`; `on_remove` runs when it is removed.
    pub fn insert_for(
        &mut self,
        owner: &'static str,
        bdev: Arc<dyn Bdev>,
        on_remove: OnRemove,
    ) -> Result<(), RegistryError> {
        validate_name(bdev.name())?;
        let uuid_alias = uuid_string(bdev.uuid());
        if self.position(bdev.name()).is_some() {
            return Err(RegistryError::Exists(bdev.name().to_owned()));
        }
        if self.position(&uuid_alias).is_some() {
            return Err(RegistryError::Exists(uuid_alias));
        }
        // Every channel opened to a registered bdev counts its I/O (`bdev_get_iostat`).
        let counted = CountedBdev::new(bdev);
        let stats = Arc::clone(counted.stats());
        self.entries.push(Entry {
            bdev: Arc::new(counted),
            stats,
            owner,
            uuid_alias,
            on_remove: Some(on_remove),
            claimed_by: None,
        });
        Ok(())
    }

    /// The I/O statistics of the bdev `name` (a name or UUID alias).
    pub fn iostat(&self, name: &str) -> Option<(Arc<dyn Bdev>, Arc<BdevIoStats>)> {
        self.position(name)
            .and_then(|i| self.entries.get(i))
            .map(|e| (Arc::clone(&e.bdev), Arc::clone(&e.stats)))
    }

    /// Every bdev with its I/O statistics, in creation order.
    pub fn iter_iostat(&self) -> impl Iterator<Item = (&Arc<dyn Bdev>, &Arc<BdevIoStats>)> {
        self.entries.iter().map(|e| (&e.bdev, &e.stats))
    }

    /// Whether `name` (a name or UUID alias) is taken.
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Looks a bdev up by name or UUID alias.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Bdev>> {
        self.position(name)
            .and_then(|i| self.entries.get(i))
            .map(|e| Arc::clone(&e.bdev))
    }

    /// Looks a bdev up by name or UUID alias, with the module that created it.
    pub fn get_with_owner(&self, name: &str) -> Option<(&'static str, Arc<dyn Bdev>)> {
        self.position(name)
            .and_then(|i| self.entries.get(i))
            .map(|e| (e.owner, Arc::clone(&e.bdev)))
    }

    /// Every bdev, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Bdev>> {
        self.entries.iter().map(|e| &e.bdev)
    }

    /// Every bdev with the module that created it, in creation order.
    pub fn iter_with_owner(&self) -> impl Iterator<Item = (&'static str, &Arc<dyn Bdev>)> {
        self.entries.iter().map(|e| (e.owner, &e.bdev))
    }

    /// Number of bdevs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes a bdev by name or UUID alias and tells its module to refuse further I/O. The
    /// claims it held on the bdevs under it are released.
    pub fn remove(&mut self, name: &str) -> Result<Arc<dyn Bdev>, RegistryError> {
        let index = self
            .position(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        let mut entry = self.entries.remove(index);
        if let Some(on_remove) = entry.on_remove.take() {
            on_remove();
        }
        for other in &mut self.entries {
            if other.claimed_by.as_deref() == Some(entry.bdev.name()) {
                other.claimed_by = None;
            }
        }
        Ok(entry.bdev)
    }

    /// Claims bdev `name` (a name or UUID alias) for bdev `by`, stacked on it, as SPDK's
    /// `spdk_bdev_module_claim_bdev` does: until `by` is removed (or [`BdevRegistry::release`]),
    /// no other bdev may claim it and no controller may export it. Returns the claimed bdev.
    pub fn claim(&mut self, name: &str, by: &str) -> Result<Arc<dyn Bdev>, RegistryError> {
        let entry = self
            .position(name)
            .and_then(|i| self.entries.get_mut(i))
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        if let Some(holder) = &entry.claimed_by {
            return Err(RegistryError::Claimed {
                name: entry.bdev.name().to_owned(),
                by: holder.clone(),
            });
        }
        entry.claimed_by = Some(by.to_owned());
        Ok(Arc::clone(&entry.bdev))
    }

    /// Releases a claim [`BdevRegistry::claim`] made on bdev `name`.
    pub fn release(&mut self, name: &str) {
        if let Some(entry) = self.position(name).and_then(|i| self.entries.get_mut(i)) {
            entry.claimed_by = None;
        }
    }

    /// The bdev that claimed bdev `name`, if any.
    pub fn claimed_by(&self, name: &str) -> Option<&str> {
        self.position(name)
            .and_then(|i| self.entries.get(i))
            .and_then(|e| e.claimed_by.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::null::NullBdev;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn null(name: &str, uuid: u8) -> Arc<NullBdev> {
        NullBdev::new(name, 8, 512, [uuid; 16]).unwrap()
    }

    #[test]
    fn names_and_uuid_aliases_are_unique() {
        let mut reg = BdevRegistry::new();
        reg.insert(null("A", 1), Box::new(|| {})).unwrap();
        reg.insert(null("B", 2), Box::new(|| {})).unwrap();
        assert_eq!(
            reg.insert(null("A", 3), Box::new(|| {})),
            Err(RegistryError::Exists("A".into()))
        );
        let alias = uuid_string([1; 16]);
        assert!(matches!(
            reg.insert(null("C", 1), Box::new(|| {})),
            Err(RegistryError::Exists(_))
        ));
        assert_eq!(
            reg.get(&alias).map(|b| b.name().to_owned()),
            Some("A".to_owned())
        );
        assert_eq!(reg.iter().map(|b| b.name()).collect::<Vec<_>>(), ["A", "B"]);
        assert!(matches!(
            reg.insert(null("", 4), Box::new(|| {})),
            Err(RegistryError::InvalidName { .. })
        ));
        assert!(matches!(
            reg.insert(null("has space", 5), Box::new(|| {})),
            Err(RegistryError::InvalidName { .. })
        ));
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn remove_runs_the_hook_once_and_frees_the_name() {
        let removed = Arc::new(AtomicUsize::new(0));
        let mut reg = BdevRegistry::new();
        let hook = Arc::clone(&removed);
        reg.insert(
            null("A", 1),
            Box::new(move || {
                hook.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        assert_eq!(
            reg.remove("X").err(),
            Some(RegistryError::NotFound("X".into()))
        );
        assert_eq!(
            reg.remove("A").map(|b| b.name().to_owned()),
            Ok("A".to_owned())
        );
        assert_eq!(removed.load(Ordering::SeqCst), 1);
        assert!(reg.is_empty());
        reg.insert(null("A", 1), Box::new(|| {})).unwrap();
    }

    #[test]
    fn a_claim_is_exclusive_and_released_with_its_holder() {
        let mut reg = BdevRegistry::new();
        reg.insert(null("Base", 1), Box::new(|| {})).unwrap();
        reg.insert(null("Top", 2), Box::new(|| {})).unwrap();
        assert_eq!(
            reg.claim("Nope", "Top").err(),
            Some(RegistryError::NotFound("Nope".into()))
        );
        assert_eq!(reg.claim("Base", "Top").unwrap().name(), "Base");
        assert_eq!(reg.claimed_by("Base"), Some("Top"));
        assert_eq!(
            reg.claim(&uuid_string([1; 16]), "Other").err(),
            Some(RegistryError::Claimed {
                name: "Base".into(),
                by: "Top".into()
            })
        );
        reg.remove("Top").unwrap();
        assert_eq!(reg.claimed_by("Base"), None);
        reg.claim("Base", "Other").unwrap();
        reg.release("Base");
        assert_eq!(reg.claimed_by("Base"), None);
    }

    #[test]
    fn uuid_strings_look_like_spdk_s() {
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(uuid_string(uuid), "12345678-9abc-def0-0123-456789abcdef");
    }
}
