//! Which sandboxes to evict so a new one fits the worker's budgets: a decision with no I/O
//! (the pool lists its candidates and destroys what the plan names).
//!
//! Idle sandboxes go first, least recently used first; then ready (pre-created) sandboxes, in
//! the order given. Busy and starting sandboxes are never candidates. When even evicting every
//! candidate would not make room, the plan is `None` and nothing is evicted: destroying warm
//! sandboxes for a request that is refused anyway would only make later requests cold.

use std::time::Instant;

/// Memory and disk, MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    pub memory_mb: u64,
    pub disk_mb: u64,
}

impl Size {
    fn fits_in(self, budget: Size) -> bool {
        self.memory_mb <= budget.memory_mb && self.disk_mb <= budget.disk_mb
    }

    fn plus(self, o: Size) -> Size {
        Size {
            memory_mb: self.memory_mb.saturating_add(o.memory_mb),
            disk_mb: self.disk_mb.saturating_add(o.disk_mb),
        }
    }

    fn minus(self, o: Size) -> Size {
        Size {
            memory_mb: self.memory_mb.saturating_sub(o.memory_mb),
            disk_mb: self.disk_mb.saturating_sub(o.disk_mb),
        }
    }
}

/// An idle sandbox that may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idle<T> {
    pub id: T,
    pub last_used: Instant,
    pub size: Size,
}

/// A ready sandbox that may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready<T> {
    pub id: T,
    pub size: Size,
}

/// What to evict, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<I, R> {
    pub idle: Vec<I>,
    pub ready: Vec<R>,
}

/// The evictions that let `need` fit in `budget` on top of `committed`, or `None` when no
/// choice of candidates makes room.
pub fn plan<I: Clone, R: Clone>(
    budget: Size,
    committed: Size,
    need: Size,
    idle: &[Idle<I>],
    ready: &[Ready<R>],
) -> Option<Plan<I, R>> {
    let mut used = committed;
    let mut out = Plan {
        idle: Vec::new(),
        ready: Vec::new(),
    };
    let mut by_age: Vec<&Idle<I>> = idle.iter().collect();
    by_age.sort_by_key(|c| c.last_used);
    let mut idle_left = by_age.into_iter();
    let mut ready_left = ready.iter();
    while !used.plus(need).fits_in(budget) {
        if let Some(c) = idle_left.next() {
            used = used.minus(c.size);
            out.idle.push(c.id.clone());
        } else if let Some(c) = ready_left.next() {
            used = used.minus(c.size);
            out.ready.push(c.id.clone());
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mb(memory_mb: u64, disk_mb: u64) -> Size {
        Size { memory_mb, disk_mb }
    }

    fn idle(id: u32, age_s: u64, now: Instant, size: Size) -> Idle<u32> {
        Idle {
            id,
            last_used: now - Duration::from_secs(age_s),
            size,
        }
    }

    #[test]
    fn what_fits_evicts_nothing() {
        let now = Instant::now();
        let p = plan::<u32, u32>(
            mb(1000, 1000),
            mb(500, 0),
            mb(500, 1000),
            &[idle(1, 5, now, mb(100, 0))],
            &[],
        );
        assert_eq!(
            p,
            Some(Plan {
                idle: vec![],
                ready: vec![]
            })
        );
    }

    #[test]
    fn least_recently_used_idle_go_first_then_ready_ones() {
        let now = Instant::now();
        let idles = [
            idle(1, 10, now, mb(200, 0)),
            idle(2, 30, now, mb(200, 0)),
            idle(3, 20, now, mb(200, 0)),
        ];
        let ready = [
            Ready {
                id: 10,
                size: mb(50, 0),
            },
            Ready {
                id: 11,
                size: mb(50, 0),
            },
        ];
        // 900 of 1000 committed, 300 needed: 200 must go, the oldest idle (2) is enough.
        let p = plan(mb(1000, 10), mb(900, 0), mb(300, 0), &idles, &ready).unwrap();
        assert_eq!(p.idle, vec![2]);
        assert!(p.ready.is_empty());
        // 750 needed: every idle one (600) and one ready one (50) make the 650 of room.
        let p = plan(mb(1000, 10), mb(900, 0), mb(750, 0), &idles, &ready).unwrap();
        assert_eq!(p.idle, vec![2, 3, 1]);
        assert_eq!(p.ready, vec![10]);
        // 800 needed: both ready ones too.
        let p = plan(mb(1000, 10), mb(900, 0), mb(800, 0), &idles, &ready).unwrap();
        assert_eq!(p.ready, vec![10, 11]);
    }

    #[test]
    fn disk_counts_as_memory_does() {
        let now = Instant::now();
        let idles = [idle(1, 10, now, mb(0, 512)), idle(2, 5, now, mb(0, 512))];
        let p =
            plan::<u32, u32>(mb(10_000, 1024), mb(100, 1024), mb(100, 512), &idles, &[]).unwrap();
        assert_eq!(p.idle, vec![1]);
    }

    #[test]
    fn when_nothing_makes_room_nothing_is_evicted() {
        let now = Instant::now();
        let idles = [idle(1, 10, now, mb(100, 0))];
        assert_eq!(
            plan::<u32, u32>(mb(1000, 10), mb(900, 0), mb(300, 0), &idles, &[]),
            None
        );
        // Bigger than the whole budget.
        assert_eq!(
            plan::<u32, u32>(mb(1000, 10), mb(0, 0), mb(1001, 0), &[], &[]),
            None
        );
    }
}
