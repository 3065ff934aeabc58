//! A generational slab: O(1) lookup by id without hashing on the packet path.

/// Identifies an entry; the generation makes ids of removed entries stale, not aliased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// A stable number for logs and external handles.
    pub fn as_u64(self) -> u64 {
        ((self.generation as u64) << 32) | self.index as u64
    }

    /// Inverse of [`Key::as_u64`].
    pub fn from_u64(v: u64) -> Self {
        Key {
            index: v as u32,
            generation: (v >> 32) as u32,
        }
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Storage for peers and rooms.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Inserts a value built from its own key.
    pub fn insert_with(&mut self, f: impl FnOnce(Key) -> T) -> Key {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        let key = Key {
            index,
            generation: slot.generation,
        };
        slot.value = Some(f(key));
        self.len += 1;
        key
    }

    /// Shared access; `None` for a stale or unknown key.
    pub fn get(&self, key: Key) -> Option<&T> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_ref()
    }

    /// Exclusive access; `None` for a stale or unknown key.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Removes and returns the value.
    pub fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let v = slot.value.take();
        if v.is_some() {
            self.free.push(key.index);
            self.len -= 1;
        }
        v
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Iterates over live entries.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.value.as_ref().map(|v| {
                (
                    Key {
                        index: i as u32,
                        generation: s.generation,
                    },
                    v,
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_do_not_alias() {
        let mut s = Slab::default();
        let a = s.insert_with(|_| 1);
        assert_eq!(s.remove(a), Some(1));
        let b = s.insert_with(|_| 2);
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(b), Some(&2));
        assert_eq!(Key::from_u64(b.as_u64()), b);
        assert_eq!(s.len(), 1);
    }
}
