//! Which user a participation belongs to, as this server has seen it: the route that lets
//! a call naming only a participation read one user's rows. On Citus the tables are
//! distributed by user id, and a participation looked up by its id alone is looked for
//! on every shard; with its user known, on one
//! (docs/decisions/0002-participation-routes.md).
//!
//! A route is a hint, never trusted: every statement it routes names both the user and
//! the participation, so a stale route (the participation deleted with its user, and
//! its id taken again for another user through a client's `request_id`) finds nothing,
//! and the caller then looks the participation up by its id alone.

use std::{collections::HashMap, sync::Mutex};

use uuid::Uuid;

/// Routes kept, at most: about 50 bytes each in memory.
const CAPACITY: usize = 200_000;

/// Participation id -> user id, for the participations this server joined or found
/// lately. Two generations: when the newer one is half the capacity, it becomes the
/// older and the older is dropped, so that the routes used lately stay.
#[derive(Debug, Default)]
pub struct Routes {
    generations: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    newer: HashMap<Uuid, Uuid>,
    older: HashMap<Uuid, Uuid>,
}

impl Routes {
    /// The user of `participation`, if this server knows it.
    pub fn user_of(&self, participation: Uuid) -> Option<Uuid> {
        let mut generations = self.lock();
        if let Some(user) = generations.newer.get(&participation) {
            return Some(*user);
        }
        let user = generations.older.remove(&participation)?;
        generations.insert(participation, user);
        Some(user)
    }

    /// Remembers that `participation` belongs to `user`.
    pub fn learn(&self, participation: Uuid, user: Uuid) {
        self.lock().insert(participation, user);
    }

    /// Forgets the route of `participation` (it led nowhere).
    pub fn forget(&self, participation: Uuid) {
        let mut generations = self.lock();
        generations.newer.remove(&participation);
        generations.older.remove(&participation);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // A panic while the lock was held left at worst a route missing: keep going.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Generations {
    fn insert(&mut self, participation: Uuid, user: Uuid) {
        if self.newer.len() >= CAPACITY / 2 {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(participation, user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_remembered_forgotten_and_bounded() {
        let routes = Routes::default();
        let (participation, user) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(routes.user_of(participation), None);
        routes.learn(participation, user);
        assert_eq!(routes.user_of(participation), Some(user));
        routes.forget(participation);
        assert_eq!(routes.user_of(participation), None);

        // A route used lately survives the turn of a generation; the oldest go.
        let first = Uuid::new_v4();
        routes.learn(first, user);
        for _ in 0..CAPACITY / 2 {
            routes.learn(Uuid::new_v4(), user);
        }
        assert!(routes.lock().older.contains_key(&first));
        assert_eq!(routes.user_of(first), Some(user));
        assert!(routes.lock().newer.contains_key(&first), "used, so kept");
        for _ in 0..CAPACITY {
            routes.learn(Uuid::new_v4(), user);
        }
        assert_eq!(routes.user_of(first), None);
        let kept = routes.lock();
        assert!(kept.newer.len() + kept.older.len() <= CAPACITY);
    }
}
