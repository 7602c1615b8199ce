//! Which theorems the next step samples: a fresh seeded shuffle every epoch, so the order is
//! reproducible from `(seed, epoch, position)` alone and a checkpoint only stores those.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    /// Theorems of this epoch already handed out.
    pub position: usize,
}

impl Cursor {
    pub fn start() -> Cursor {
        Cursor {
            epoch: 0,
            position: 0,
        }
    }

    /// The next `count` theorem indices out of `len`, moving to the next epoch (a new shuffle)
    /// when this one runs out.
    pub fn take(&mut self, count: usize, len: usize, seed: u64) -> Vec<usize> {
        let mut out = Vec::with_capacity(count);
        if len == 0 {
            return out;
        }
        let mut order = epoch_order(len, seed, self.epoch);
        while out.len() < count {
            if self.position == len {
                self.epoch += 1;
                self.position = 0;
                order = epoch_order(len, seed, self.epoch);
            }
            out.push(order[self.position]);
            self.position += 1;
        }
        out
    }
}

fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation_and_resumes_exactly() {
        let mut a = Cursor::start();
        let first: Vec<usize> = a.take(7, 7, 1);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        let second = a.take(7, 7, 1);
        assert_ne!(first, second, "each epoch reshuffles");
        let mut b = Cursor::start();
        b.take(3, 7, 1);
        let saved = b;
        let rest = b.take(11, 7, 1);
        let mut resumed = saved;
        assert_eq!(resumed.take(11, 7, 1), rest);
        assert_eq!([&first[3..], &second[..]].concat(), rest);
    }
}
