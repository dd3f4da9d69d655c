//! The [`QuotaStore`] contract.

use jiff::Timestamp;

use crate::limit::QuotaRule;
use crate::quota::QuotaStore;

/// `s`, a time written in 2026 or 2027, moved on to lie as many years
/// after this one: the suite's months are all in the future. A store may
/// drop old months ("old months may be dropped"), judged on its own clock
/// (a counter expiring at its month's end plus a grace, say): months in
/// the past were dropped at once, and the store failed.
fn ts(s: &str) -> Timestamp {
    let next = jiff::tz::Offset::UTC.to_datetime(Timestamp::now()).year() + 1;
    let year: i16 = s[..4].parse().expect("a year");
    format!("{}{}", year - 2026 + next, &s[4..]).parse().expect("valid timestamp")
}

/// Runs every check against `store` for accounts starting with `prefix`.
///
/// # Panics
///
/// When the store breaks the [`QuotaStore`] contract.
pub async fn run<S: QuotaStore>(store: &S, prefix: &str) {
    let acct = format!("{prefix}:a");
    let rules = [QuotaRule::new("notifications", 3, &["email", "webhook"])];
    let jan = ts("2026-01-31T23:59:59Z");
    for i in 0..3 {
        let d = store.check_and_count(&acct, &rules, "webhook", 1, jan).await.unwrap();
        assert!(d.allowed, "unit {i} of 3");
        assert_eq!(d.used, i + 1);
    }
    let d = store.check_and_count(&acct, &rules, "email", 1, jan).await.unwrap();
    assert!(!d.allowed, "the fourth unit is denied");
    assert_eq!((d.used, d.limit), (3, 3));
    assert!(!d.cost_exceeds_limit, "a used-up month is not a cost above the limit: {d:?}");
    assert_eq!(d.resets_at, ts("2026-02-01T00:00:00Z"));
    assert_eq!(store.rule_usage(&acct, &rules[0], jan).await.unwrap(), 3, "denials count nothing");
    assert_eq!(store.usage(&acct, "webhook", jan).await.unwrap(), 3, "each category its own");
    assert_eq!(store.usage(&acct, "email", jan).await.unwrap(), 0, "the denied email");
    let d = store
        .check_and_count(&acct, &rules, "webhook", 2, ts("2026-02-01T00:00:00Z"))
        .await
        .unwrap();
    assert!(d.allowed && d.used == 2, "a new month starts from zero");
    // Huge limits and costs neither overflow nor fail part-way.
    let huge_acct = format!("{prefix}:huge");
    let huge = [QuotaRule::new("huge", u64::MAX, &["x"])];
    let d = store.check_and_count(&huge_acct, &huge, "x", 1, jan).await.unwrap();
    assert!(d.allowed && d.used == 1);
    let d = store.check_and_count(&huge_acct, &huge, "x", u64::MAX, jan).await.unwrap();
    assert!(!d.allowed && d.used == 1, "used + cost past u64 is past the limit");
    let d = store.check_and_count(&huge_acct, &huge, "x", 1, jan).await.unwrap();
    assert!(d.allowed && d.used == 2, "the refused cost was not counted");
    let d = store.check_and_count(&acct, &rules, "sms", 1000, jan).await.unwrap();
    assert!(d.allowed && d.rule.is_none(), "uncounted categories are unlimited");
    assert_eq!(store.usage(&acct, "sms", jan).await.unwrap(), 0, "and not counted");
    let d = store
        .check_and_count(&acct, &rules, "webhook", 4, ts("2026-03-01T00:00:00Z"))
        .await
        .unwrap();
    assert!(
        !d.allowed && d.used == 0 && d.cost_exceeds_limit,
        "a cost above the limit is denied, not counted, and reported as such: {d:?}"
    );

    several_rules(store, prefix).await;

    // Calls stamped on both sides of midnight on the 1st, interleaved (two
    // servers, or times read before a lock): each counts in the month it
    // is stamped with, neither erasing nor adding to the other's.
    let acct = format!("{prefix}:c");
    let rules = [QuotaRule::new("n", 3, &["x"])];
    let (before, after) = (ts("2026-01-31T23:59:59Z"), ts("2026-02-01T00:00:00Z"));
    let mut admitted = 0;
    for i in 0..20 {
        let now = if i % 2 == 0 { after } else { before };
        admitted +=
            u32::from(store.check_and_count(&acct, &rules, "x", 1, now).await.unwrap().allowed);
    }
    assert_eq!(admitted, 6, "each month admits its own 3");
    assert_eq!(store.usage(&acct, "x", before).await.unwrap(), 3, "January's count");
    assert_eq!(store.usage(&acct, "x", after).await.unwrap(), 3, "February's count");
    let d = store.check_and_count(&acct, &rules, "x", 1, before).await.unwrap();
    assert!(!d.allowed && d.used == 3, "{d:?}");
    assert_eq!(d.resets_at, after, "a January call is refused until February");

    // Rules counting one category (under one name, even, or listing it
    // twice): each is checked, the category counted once.
    let acct = format!("{prefix}:twice");
    let rules = [QuotaRule::new("n", 5, &["x", "x"]), QuotaRule::new("n", 3, &["x"])];
    let t = ts("2026-08-08T00:00:00Z");
    for i in 1..=3 {
        let d = store.check_and_count(&acct, &rules, "x", 1, t).await.unwrap();
        assert!(d.allowed, "unit {i}");
        assert_eq!(store.usage(&acct, "x", t).await.unwrap(), i, "counted once");
        assert_eq!(store.rule_usage(&acct, &rules[0], t).await.unwrap(), i, "summed once");
    }
    assert!(!store.check_and_count(&acct, &rules, "x", 1, t).await.unwrap().allowed);

    december(store, prefix).await;
    plan_change(store, prefix).await;
    refunds(store, prefix).await;
    opaque_names(store, prefix).await;

    // Accounts are separate, even under one rule name.
    let r = [QuotaRule::new("shared", 1, &["x"])];
    let t = ts("2026-07-01T00:00:00Z");
    assert!(store.check_and_count(&format!("{prefix}:e1"), &r, "x", 1, t).await.unwrap().allowed);
    assert!(
        store.check_and_count(&format!("{prefix}:e2"), &r, "x", 1, t).await.unwrap().allowed,
        "accounts are separate"
    );

    // A cost above one rule's whole limit is reported as such, even when
    // another rule, checked first, is merely used up this month.
    let acct = format!("{prefix}:d");
    let rules = [QuotaRule::new("big", 200, &["x", "y"]), QuotaRule::new("small", 100, &["x"])];
    let t = ts("2026-06-10T00:00:00Z");
    assert!(store.check_and_count(&acct, &rules, "y", 200, t).await.unwrap().allowed);
    let d = store.check_and_count(&acct, &rules, "x", 150, t).await.unwrap();
    assert!(!d.allowed && d.cost_exceeds_limit, "{d:?}");
    assert_eq!(d.rule.as_deref(), Some("small"));
}

/// Several rules: all must have room, and all are counted together.
async fn several_rules<S: QuotaStore>(store: &S, prefix: &str) {
    let acct = format!("{prefix}:b");
    let rules = [
        QuotaRule::new("all", 10, &["email", "webhook"]),
        QuotaRule::new("hooks", 2, &["webhook"]),
    ];
    let t = ts("2026-05-05T00:00:00Z");
    let d = store.check_and_count(&acct, &rules, "webhook", 2, t).await.unwrap();
    assert!(d.allowed);
    // `QuotaDecision::rule`: the tightest counting rule (fewest units left).
    assert_eq!(
        (d.rule.as_deref(), d.used, d.limit),
        (Some("hooks"), 2, 2),
        "an admission reports the tightest rule: {d:?}"
    );
    let d = store.check_and_count(&acct, &rules, "webhook", 1, t).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.rule.as_deref(), Some("hooks"));
    assert_eq!(store.rule_usage(&acct, &rules[0], t).await.unwrap(), 2, "a denial charges no rule");
    assert!(store.check_and_count(&acct, &rules, "email", 8, t).await.unwrap().allowed);
    assert!(!store.check_and_count(&acct, &rules, "email", 1, t).await.unwrap().allowed);
}

/// December resets on 1 January of the next year; a month a year later
/// starts from zero (counters are per year and month).
async fn december<S: QuotaStore>(store: &S, prefix: &str) {
    let acct = format!("{prefix}:y");
    let rules = [QuotaRule::new("n", 1, &["x"])];
    let dec = ts("2026-12-31T23:59:59Z");
    assert!(store.check_and_count(&acct, &rules, "x", 1, dec).await.unwrap().allowed);
    let d = store.check_and_count(&acct, &rules, "x", 1, dec).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.resets_at, ts("2027-01-01T00:00:00Z"), "December resets in January");
    let d = store.check_and_count(&acct, &rules, "x", 1, ts("2027-12-01T00:00:00Z")).await.unwrap();
    assert!(d.allowed && d.used == 1, "a year later, December starts from zero: {d:?}");
}

/// A plan change in the middle of a month: usage is per category, and each
/// plan's rules read the categories they count. Emails counted with
/// webhooks, then a plan counting webhooks only: its webhooks are all
/// there. Emails it leaves uncounted are not counted for a plan counting
/// both later.
async fn plan_change<S: QuotaStore>(store: &S, prefix: &str) {
    let acct = format!("{prefix}:plans");
    let both = [QuotaRule::new("notifications", 5, &["email", "webhook"])];
    let hooks = [QuotaRule::new("notifications", 3, &["webhook"])];
    let t = ts("2026-09-09T00:00:00Z");
    assert!(store.check_and_count(&acct, &both, "email", 5, t).await.unwrap().allowed);
    assert!(!store.check_and_count(&acct, &both, "webhook", 1, t).await.unwrap().allowed);
    let d = store.check_and_count(&acct, &hooks, "webhook", 3, t).await.unwrap();
    assert!(d.allowed && d.used == 3, "the upgrade's webhooks, not the emails: {d:?}");
    assert!(store.check_and_count(&acct, &hooks, "email", 2, t).await.unwrap().allowed);
    let d = store.check_and_count(&acct, &both, "webhook", 1, t).await.unwrap();
    assert!(!d.allowed && d.used == 8, "back on both: 5 emails and 3 webhooks: {d:?}");
    assert_eq!(store.usage(&acct, "email", t).await.unwrap(), 5, "the uncounted two are not");
}

/// Refunds: an admitted check's units are given back into its account's
/// counter of its category (not another category's of its rule, nor
/// another account's), no more than it counted,
/// once, never below zero, not for a denied or uncounted check, and not
/// once its month has ended.
async fn refunds<S: QuotaStore>(store: &S, prefix: &str) {
    let acct = format!("{prefix}:refund");
    let rules = [QuotaRule::new("n", 6, &["email", "webhook"])];
    let t = ts("2026-04-10T00:00:00Z");
    let count = |category, cost| store.check_and_count(&acct, &rules, category, cost, t);
    let hooks = || store.usage(&acct, "webhook", t);
    let other = format!("{prefix}:refund-other");
    assert!(store.check_and_count(&other, &rules, "webhook", 1, t).await.unwrap().allowed);
    assert!(count("email", 1).await.unwrap().allowed);
    let (mut a, mut c) = (count("webhook", 2).await.unwrap(), count("webhook", 2).await.unwrap());
    assert!(a.allowed && c.allowed && c.used == 5, "{c:?}");
    store.refund(&acct, "webhook", 1, &mut c, t).await.unwrap();
    assert_eq!(hooks().await.unwrap(), 3, "a refund gives back what the check counted");
    // A rule counting two categories: the email it counted stays, and the
    // rule's usage drops by the webhook given back, exactly.
    assert_eq!(
        (
            store.usage(&acct, "email", t).await.unwrap(),
            store.rule_usage(&acct, &rules[0], t).await.unwrap()
        ),
        (1, 4),
        "a refund gives back into the check's category only"
    );
    store.refund(&acct, "webhook", 5, &mut a, t).await.unwrap();
    assert_eq!(hooks().await.unwrap(), 1, "a refund gives back at most what the check counted");
    store.refund(&acct, "webhook", 5, &mut a, t).await.unwrap();
    assert_eq!(hooks().await.unwrap(), 1, "a decision refunded twice gives back once");
    // Four more webhooks fill the month: an email is denied, and its
    // refund, or an uncounted check's, gives nothing back.
    assert!(count("webhook", 4).await.unwrap().allowed);
    let mut denied = count("email", 1).await.unwrap();
    assert!(!denied.allowed, "{denied:?}");
    store.refund(&acct, "email", 1, &mut denied, t).await.unwrap();
    store.refund(&acct, "webhook", 1, &mut denied, t).await.unwrap();
    let mut uncounted = count("sms", 3).await.unwrap();
    assert!(uncounted.allowed && uncounted.rule.is_none(), "{uncounted:?}");
    store.refund(&acct, "webhook", 3, &mut uncounted, t).await.unwrap();
    assert_eq!(hooks().await.unwrap(), 5, "a denied or uncounted check gives nothing back");
    assert_eq!(store.usage(&acct, "email", t).await.unwrap(), 1, "nor takes an email off");
    assert_eq!(
        store.usage(&other, "webhook", t).await.unwrap(),
        1,
        "a refund gives back into the check's account only"
    );
    assert!(!count("webhook", 1).await.unwrap().allowed, "the month is still full");

    // Copies of one decision each keep its count (refund one, not each):
    // refunded both, the counter stops at zero and counts on from there.
    let acct = format!("{prefix}:refund-copies");
    let rules = [QuotaRule::new("n", 5, &["x"])];
    let mut d = store.check_and_count(&acct, &rules, "x", 2, t).await.unwrap();
    let mut copy = d.clone();
    store.refund(&acct, "x", 2, &mut d, t).await.unwrap();
    store.refund(&acct, "x", 2, &mut copy, t).await.unwrap();
    assert_eq!(store.usage(&acct, "x", t).await.unwrap(), 0, "never below zero");
    let d = store.check_and_count(&acct, &rules, "x", 5, t).await.unwrap();
    assert!(d.allowed && d.used == 5, "counted on from zero: {d:?}");

    // A check stamped before midnight on the 1st, refunded after it: the
    // new month was never charged, and the ended one stays as it was.
    let acct = format!("{prefix}:refund-late");
    let rules = [QuotaRule::new("n", 3, &["x"])];
    let (jan, feb) = (ts("2026-01-31T23:59:59Z"), ts("2026-02-01T00:00:00Z"));
    let mut d = store.check_and_count(&acct, &rules, "x", 2, jan).await.unwrap();
    assert!(d.allowed);
    assert!(store.check_and_count(&acct, &rules, "x", 3, feb).await.unwrap().allowed);
    store.refund(&acct, "x", 2, &mut d, feb).await.unwrap();
    assert_eq!(store.usage(&acct, "x", feb).await.unwrap(), 3, "the new month was never charged");
    assert_eq!(
        store.usage(&acct, "x", jan).await.unwrap(),
        2,
        "a refund after the month ended gives nothing back"
    );
}

/// Accounts and categories are opaque strings: two pairs that read alike
/// once joined with separators (`{account}:{month}:{category}`) count
/// apart.
async fn opaque_names<S: QuotaStore>(store: &S, prefix: &str) {
    let t = ts("2026-01-10T00:00:00Z");
    let month = t.strftime("%Y-%m");
    let (a1, c1) = (format!("{prefix}:o}}:{month}:c:x"), "y");
    let (a2, c2) = (format!("{prefix}:o"), format!("x}}:{month}:c:y"));
    let d = store.check_and_count(&a1, &[QuotaRule::new("q", 1, &[c1])], c1, 1, t).await.unwrap();
    assert!(d.allowed);
    let c2 = c2.as_str();
    let d = store.check_and_count(&a2, &[QuotaRule::new("q", 1, &[c2])], c2, 1, t).await.unwrap();
    assert!(d.allowed && d.used == 1, "another account's category: {d:?}");
}

/// Races `threads` threads, each counting `per_thread` single units of one
/// category for one account under two rules: exactly the tighter limit is
/// counted, and both counters end at it. Then races threads counting two
/// categories (`email` and `webhook`, alternately) that one rule counts:
/// exactly its limit is counted across both (a store that locks only the
/// counted category's counter lets them past it). Then races checks with
/// refunds of every other admitted one: what stays counted is exactly
/// what was admitted less what was given back. Threads drive the
/// futures with [`block_on`](super::portal::block_on); see
/// [`super::keys::race`].
///
/// # Panics
///
/// When more or fewer units are counted than the limit, or than were
/// admitted and not given back.
pub fn race<S: QuotaStore + Sync>(store: &S, prefix: &str, threads: usize, per_thread: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let account = format!("{prefix}:race");
    let rules = [
        QuotaRule::new("all", 100, &["email", "webhook"]),
        QuotaRule::new("hooks", 40, &["webhook"]),
    ];
    let now = ts("2026-03-15T12:00:00Z");
    let counted = AtomicU64::new(0);
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|sc| {
        for _ in 0..threads {
            let (account, rules, counted, barrier) = (&account, &rules, &counted, &barrier);
            sc.spawn(move || {
                barrier.wait();
                for _ in 0..per_thread {
                    let check = store.check_and_count(account, rules, "webhook", 1, now);
                    if super::portal::block_on(check).expect("count").allowed {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let want = 40.min(u64::try_from(threads * per_thread).unwrap_or(u64::MAX));
    assert_eq!(counted.into_inner(), want, "exactly the tighter limit is counted");
    for rule in &rules {
        let used =
            super::portal::block_on_apart(|| store.rule_usage(&account, rule, now)).expect("usage");
        assert_eq!(used, want, "{}: denials counted nothing, admissions counted once", rule.name);
    }

    // Two categories under one rule: a check reads both counters and
    // counts one, in one step.
    let account = format!("{prefix}:race-mixed");
    let rules = [QuotaRule::new("all", 30, &["email", "webhook"])];
    let counted = AtomicU64::new(0);
    std::thread::scope(|sc| {
        for t in 0..threads {
            let (account, rules, counted, barrier) = (&account, &rules, &counted, &barrier);
            let category = if t % 2 == 0 { "email" } else { "webhook" };
            sc.spawn(move || {
                barrier.wait();
                for _ in 0..per_thread {
                    let check = store.check_and_count(account, rules, category, 1, now);
                    if super::portal::block_on(check).expect("count").allowed {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let want = 30.min(u64::try_from(threads * per_thread).unwrap_or(u64::MAX));
    let used = super::portal::block_on_apart(|| store.rule_usage(&account, &rules[0], now))
        .expect("usage");
    assert_eq!(
        (counted.into_inner(), used),
        (want, want),
        "two categories of one rule: exactly its limit is counted across both"
    );

    // Refunds racing checks (and each other): every other admitted check
    // is given back at once. A refund is one step on the counter (not a
    // read, then a write of the count less the units, which loses the
    // counts made in between): what stays counted is exactly what was
    // admitted and not given back.
    let account = format!("{prefix}:race-refunds");
    let rules = [QuotaRule::new("n", 40, &["x"])];
    let (admitted, refunded) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|sc| {
        for _ in 0..threads {
            let (account, rules, barrier) = (&account, &rules, &barrier);
            let (admitted, refunded) = (&admitted, &refunded);
            sc.spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    let check = store.check_and_count(account, rules, "x", 1, now);
                    let mut d = super::portal::block_on(check).expect("count");
                    if !d.allowed {
                        continue;
                    }
                    admitted.fetch_add(1, Ordering::Relaxed);
                    if i % 2 == 0 {
                        let refund = store.refund(account, "x", 1, &mut d, now);
                        super::portal::block_on(refund).expect("refund");
                        refunded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let used = super::portal::block_on_apart(|| store.usage(&account, "x", now)).expect("usage");
    let (admitted, refunded) = (admitted.into_inner(), refunded.into_inner());
    assert_eq!(
        used,
        admitted - refunded,
        "refunds racing checks: what stays counted is what was admitted less what was given back"
    );
    assert!(used <= 40, "refunds racing checks: {used} counted under a limit of 40");
}
