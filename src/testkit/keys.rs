//! The [`KeyStore`] contract.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;

use crate::format::{Environment, NK, SK};
use crate::hash::{Algorithm, Hasher, PepperId, StoredDigest};
use crate::store::{ActiveLimit, InsertOutcome, KeyRecord, KeyStore, RecordId, Tenant};

/// The suite's times: `secs` after the whole hour before the current one,
/// so every time it uses lies in the past (a store judging anything on its
/// own clock, not `ActiveLimit::now`, sees those records expired) but only
/// hours back: a store may forget a record a retention after it ended, on
/// its own clock, and one with a retention of a few hours keeps the
/// suite's records. (Fixed times in January 2026 made such a store forget
/// them at once, and fail.) [`run`] and [`race`] wait out an hour's last
/// seconds, so that their times do not move during a run.
fn t(secs: i64) -> Timestamp {
    let now = Timestamp::now().as_second();
    let base = now - now.rem_euclid(3600) - 3600;
    Timestamp::from_second(base + secs).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Waits out the last 20 seconds of an hour, when [`t`] would move on
/// during a run.
fn clear_of_the_hour() {
    let left = 3600 - Timestamp::now().as_second().rem_euclid(3600);
    if left < 20 {
        std::thread::sleep(std::time::Duration::from_secs(left.unsigned_abs() + 1));
    }
}

/// A fresh active record of format `sk` (or `nk` when `with_key_id`) in
/// workspace `ws`, project `project`, created at `t(created)`.
///
/// # Panics
///
/// Never for valid arguments (ids are generated from valid parts).
#[must_use]
pub fn sample_record(
    ws: &str,
    project: Option<&str>,
    created: i64,
    with_key_id: bool,
) -> KeyRecord {
    let format = if with_key_id { NK } else { SK };
    let key = format.mint_default().expect("OS RNG");
    let mut tenant = Tenant::workspace(ws.parse().expect("valid workspace"));
    if let Some(p) = project {
        tenant = tenant.with_project(p.parse().expect("valid project"));
    }
    KeyRecord {
        id: RecordId::generate().expect("OS RNG"),
        name: "sample".into(),
        hint: key.hint(),
        digest: Hasher::sha256().digest(key.expose_secret().as_bytes()),
        format: format.name().into(),
        key_id: key.key_id(),
        environment: Some(Environment::LIVE),
        region: None,
        tenant,
        scopes: Arc::from(["applications:read".parse().expect("valid scope")]),
        plan: None,
        created_at: t(created),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        metadata: BTreeMap::from([("team".into(), "core".into())]),
    }
}

/// Runs every check against fresh stores from `make`. Its records end up
/// to two hours before the real time: a store forgetting ended records
/// sooner than that (a shorter retention) fails it.
///
/// # Panics
///
/// When the store breaks the [`KeyStore`] contract.
pub async fn run<S: KeyStore, F: Fn() -> S>(make: F) {
    clear_of_the_hour();
    insert_and_find(&make()).await;
    uniqueness(&make()).await;
    active_cap(&make()).await;
    replacing(&make()).await;
    duplicates_before_replaced(&make()).await;
    listing(&make()).await;
    revoke_and_expiry(&make()).await;
    last_use(&make()).await;
}

async fn insert_and_find<S: KeyStore>(s: &S) {
    let mut r = sample_record("ws_a", Some("p1"), 0, false);
    // Metadata values as given, an empty one too (a database storing the
    // empty string as NULL, as Oracle does, must not drop it).
    r.metadata.insert("note".into(), "".into());
    assert_eq!(
        s.insert(Arc::new(r.clone()), None).await.unwrap(),
        InsertOutcome::Inserted,
        "insert"
    );
    let got = s.find_by_digest(&r.digest).await.unwrap().expect("find_by_digest finds the record");
    assert_eq!(*got, r, "find_by_digest returns the record as stored");
    assert_eq!(*s.get(&r.id).await.unwrap().expect("get finds the record"), r);
    let other = sample_record("ws_a", Some("p1"), 0, false);
    assert!(s.find_by_digest(&other.digest).await.unwrap().is_none(), "unknown digest is None");
    assert!(s.get(&other.id).await.unwrap().is_none(), "unknown id is None");
    let other_alg = StoredDigest::new(Algorithm::HmacSha256(PepperId(1)), *r.digest.digest());
    assert!(
        s.find_by_digest(&other_alg).await.unwrap().is_none(),
        "digests compare with their algorithm"
    );

    let nk = sample_record("ws_a", Some("p1"), 1, true);
    let kid = nk.key_id.expect("nk has a key id");
    assert_eq!(s.insert(Arc::new(nk.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let got = s.find_by_key_id("nk", &kid).await.unwrap().expect("find_by_key_id finds it");
    assert_eq!(*got, nk, "find_by_key_id returns the record as stored");
    assert!(s.find_by_key_id("sk", &kid).await.unwrap().is_none(), "key ids are per format");

    // Every field round-trips, the optional ones set: an application (a
    // portal token's tenant: dropping it would reach every application), an
    // expiry set at insert, a plan, a region, a last use; no environment,
    // no metadata. Times to the nanosecond, as a clock gives them: a store
    // keeping microseconds or seconds changes them (rounding an expiry up
    // extends it).
    let ns = |t: Timestamp| t.checked_add(jiff::SignedDuration::from_nanos(987_654_321));
    let mut full = sample_record("ws_a", Some("p1"), 2, true);
    full.tenant = full.tenant.clone().with_application("app_1".parse().expect("valid id"));
    full.created_at = ns(full.created_at).expect("in range");
    full.expires_at = Some(ns(t(1000)).expect("in range"));
    full.plan = Some("pro".into());
    full.environment = None;
    full.region = Some("eu".parse().expect("valid region"));
    full.last_used_at = Some(ns(t(1)).expect("in range"));
    full.metadata.clear();
    // Scopes in their order, which is not sorted: the manager keeps them
    // as asked, and the host shows them so.
    full.scopes = Arc::from([
        "applications:write".parse().expect("valid scope"),
        "applications:read".parse().expect("valid scope"),
    ]);
    assert_eq!(s.insert(Arc::new(full.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(*s.get(&full.id).await.unwrap().expect("stored"), full, "every field kept");
    assert_eq!(*s.find_by_digest(&full.digest).await.unwrap().expect("stored"), full);
    let kid = full.key_id.expect("nk has a key id");
    assert_eq!(*s.find_by_key_id("nk", &kid).await.unwrap().expect("stored"), full);
}

async fn uniqueness<S: KeyStore>(s: &S) {
    let r = sample_record("ws_a", None, 0, true);
    assert_eq!(s.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let mut one_per_record_id = sample_record("ws_a", None, 0, false);
    one_per_record_id.id = r.id.clone();
    assert_eq!(
        s.insert(Arc::new(one_per_record_id.clone()), None).await.unwrap(),
        InsertOutcome::DuplicateId
    );
    let mut same_digest = sample_record("ws_a", None, 0, false);
    same_digest.digest = r.digest;
    assert_eq!(
        s.insert(Arc::new(same_digest.clone()), None).await.unwrap(),
        InsertOutcome::DuplicateKey
    );
    // Neither refusal left anything behind.
    assert!(
        s.find_by_digest(&one_per_record_id.digest).await.unwrap().is_none(),
        "refused id: no digest"
    );
    assert!(s.get(&same_digest.id).await.unwrap().is_none(), "refused digest: no record");
    let all = s.list(&"ws_a".parse().expect("valid id"), None).await.unwrap();
    assert_eq!(all.iter().map(|x| x.id.clone()).collect::<Vec<_>>(), vec![r.id.clone()]);
    let mut dup_key_id = sample_record("ws_a", None, 0, true);
    dup_key_id.key_id = r.key_id;
    assert_eq!(
        s.insert(Arc::new(dup_key_id.clone()), None).await.unwrap(),
        InsertOutcome::DuplicateKey
    );
    // A refused insert leaves no trace in any index: not its id, not its
    // (new) digest, and the key id still finds the first record.
    assert!(s.get(&dup_key_id.id).await.unwrap().is_none(), "refused: no record");
    assert!(
        s.find_by_digest(&dup_key_id.digest).await.unwrap().is_none(),
        "refused: no digest index entry"
    );
    let kid = r.key_id.expect("nk has a key id");
    let by_kid = s.find_by_key_id("nk", &kid).await.unwrap().expect("first record kept");
    assert_eq!(by_kid.id, r.id, "refused: the key id still finds the first record");
    assert_eq!(*s.find_by_digest(&r.digest).await.unwrap().unwrap(), r, "first record intact");
    // Key ids are unique per format: a record of another format may hold
    // the same key id, and each format's lookup finds its own record.
    let mut other_format = sample_record("ws_a", None, 0, true);
    other_format.format = "ck".into();
    other_format.key_id = r.key_id;
    assert_eq!(
        s.insert(Arc::new(other_format.clone()), None).await.unwrap(),
        InsertOutcome::Inserted,
        "key ids are unique per format"
    );
    let got = s.find_by_key_id("ck", &kid).await.unwrap().expect("stored");
    assert_eq!(got.id, other_format.id, "each format's key id finds its own record");
    assert_eq!(s.find_by_key_id("nk", &kid).await.unwrap().expect("kept").id, r.id);
}

async fn active_cap<S: KeyStore>(s: &S) {
    let limit = ActiveLimit::new(3, t(100));
    for i in 0..3 {
        let r = sample_record("ws_a", Some("capped"), i, false);
        assert_eq!(
            s.insert(Arc::new(r), Some(limit.clone())).await.unwrap(),
            InsertOutcome::Inserted,
            "key {i}"
        );
    }
    let fourth = sample_record("ws_a", Some("capped"), 3, false);
    assert_eq!(
        s.insert(Arc::new(fourth.clone()), Some(limit.clone())).await.unwrap(),
        InsertOutcome::LimitReached { max: 3 },
        "the cap is enforced"
    );
    assert!(s.get(&fourth.id).await.unwrap().is_none(), "a refused insert stores nothing");
    // Duplicates are checked before the cap: at the cap, a taken id or
    // digest is still reported as such.
    let held = s.list(&"ws_a".parse().unwrap(), Some(&"capped".parse().unwrap())).await.unwrap();
    let mut one_per_record_id = sample_record("ws_a", Some("capped"), 3, false);
    one_per_record_id.id = held[0].id.clone();
    let mut same_digest = sample_record("ws_a", Some("capped"), 3, false);
    same_digest.digest = held[0].digest;
    for (r, want) in [
        (one_per_record_id, InsertOutcome::DuplicateId),
        (same_digest, InsertOutcome::DuplicateKey),
    ] {
        assert_eq!(
            s.insert(Arc::new(r), Some(limit.clone())).await.unwrap(),
            want,
            "duplicates are checked before the cap"
        );
    }
    // Other projects and workspaces have their own count.
    let other = sample_record("ws_a", Some("other"), 0, false);
    assert_eq!(
        s.insert(Arc::new(other), Some(limit.clone())).await.unwrap(),
        InsertOutcome::Inserted
    );
    let other_ws = sample_record("ws_b", Some("capped"), 0, false);
    assert_eq!(
        s.insert(Arc::new(other_ws), Some(limit.clone())).await.unwrap(),
        InsertOutcome::Inserted
    );
    // Revoked and expired keys do not count. A revocation counts whatever
    // its time: this one is stamped after `limit.now` (by a clock ahead of
    // the caller's), and the key is revoked all the same.
    let listed = s.list(&"ws_a".parse().unwrap(), Some(&"capped".parse().unwrap())).await.unwrap();
    s.revoke(&listed[0].id, t(150)).await.unwrap();
    assert_eq!(
        s.insert(Arc::new(fourth.clone()), Some(limit.clone())).await.unwrap(),
        InsertOutcome::Inserted,
        "revoked after limit.now: revoked all the same"
    );
    s.shorten_expiry(&listed[1].id, t(100)).await.unwrap();
    let fifth = sample_record("ws_a", Some("capped"), 4, false);
    assert_eq!(
        s.insert(Arc::new(fifth), Some(limit.clone())).await.unwrap(),
        InsertOutcome::Inserted,
        "expired at now"
    );
    // Without a limit, or without a project, there is no cap.
    let sixth = sample_record("ws_a", Some("capped"), 5, false);
    assert_eq!(s.insert(Arc::new(sixth), None).await.unwrap(), InsertOutcome::Inserted);
    let one = ActiveLimit::new(1, t(100));
    for i in 0..2 {
        let whole = sample_record("ws_c", None, i, false);
        assert_eq!(
            s.insert(Arc::new(whole), Some(one.clone())).await.unwrap(),
            InsertOutcome::Inserted,
            "no project, no cap"
        );
    }
    let in_p = sample_record("ws_c", Some("p"), 3, false);
    assert_eq!(
        s.insert(Arc::new(in_p), Some(one.clone())).await.unwrap(),
        InsertOutcome::Inserted,
        "workspace-wide keys do not count against a project"
    );
    // Keys expiring after `limit.now` are active, judged at `limit.now`
    // (not the store's clock).
    let two = ActiveLimit::new(2, t(100));
    for exp in [t(1000), t(1000), t(50)] {
        let mut r = sample_record("ws_a", Some("cap2"), 0, false);
        r.expires_at = Some(exp);
        assert_eq!(s.insert(Arc::new(r), None).await.unwrap(), InsertOutcome::Inserted);
    }
    assert_eq!(
        s.insert(Arc::new(sample_record("ws_a", Some("cap2"), 1, false)), Some(two.clone()))
            .await
            .unwrap(),
        InsertOutcome::LimitReached { max: 2 },
        "two keys expire after limit.now: both count"
    );
}

async fn replacing<S: KeyStore>(s: &S) {
    let now = t(100);
    let mut held = Vec::new();
    for i in 0..2 {
        let r = sample_record("ws_r", Some("p"), i, false);
        held.push(r.id.clone());
        assert_eq!(s.insert(Arc::new(r), None).await.unwrap(), InsertOutcome::Inserted);
    }
    let roll =
        |id: &RecordId| ActiveLimit { replacing: Some(id.clone()), ..ActiveLimit::new(2, now) };
    // At the cap: the replaced record is not counted, so a roll fits (one
    // over the cap during the grace) and a plain insert does not.
    let first = sample_record("ws_r", Some("p"), 2, false);
    assert_eq!(
        s.insert(Arc::new(first.clone()), Some(roll(&held[0]))).await.unwrap(),
        InsertOutcome::Inserted,
        "the replaced record is not counted"
    );
    assert_eq!(
        s.insert(Arc::new(sample_record("ws_r", Some("p"), 3, false)), Some(roll(&held[1])))
            .await
            .unwrap(),
        InsertOutcome::LimitReached { max: 2 },
        "everything else is counted"
    );
    // One active replacement per record: a second roll of held[0] (two
    // rolls racing) stores nothing, capped or not — until the first
    // replacement stops.
    let again = sample_record("ws_r", Some("p"), 8, false);
    for max in [2, u32::MAX] {
        let limit = ActiveLimit { replacing: Some(held[0].clone()), ..ActiveLimit::new(max, now) };
        assert_eq!(
            s.insert(Arc::new(again.clone()), Some(limit)).await.unwrap(),
            InsertOutcome::AlreadyReplaced,
            "max {max}"
        );
        assert!(s.get(&again.id).await.unwrap().is_none(), "a refused insert stores nothing");
    }
    s.revoke(&first.id, t(50)).await.unwrap();
    assert_eq!(
        s.insert(Arc::new(again.clone()), Some(roll(&held[0]))).await.unwrap(),
        InsertOutcome::Inserted,
        "the first replacement is revoked"
    );
    // A revoked, expired or unknown record cannot be replaced, capped or not
    // (revoked whatever the time of the revocation: after `now` here).
    s.revoke(&held[1], t(150)).await.unwrap();
    let mut expired = sample_record("ws_r", Some("q"), 0, false);
    expired.expires_at = Some(now);
    let expired_id = expired.id.clone();
    assert_eq!(s.insert(Arc::new(expired), None).await.unwrap(), InsertOutcome::Inserted);
    let unknown = sample_record("ws_r", None, 0, false).id;
    for (old, why) in
        [(&held[1], "revoked"), (&expired_id, "expired at now"), (&unknown, "unknown")]
    {
        for max in [2, u32::MAX] {
            // In "p", at its cap: the replaced record is checked first.
            let r = sample_record("ws_r", Some("p"), 4, false);
            let limit = ActiveLimit { replacing: Some(old.clone()), ..ActiveLimit::new(max, now) };
            assert_eq!(
                s.insert(Arc::new(r.clone()), Some(limit)).await.unwrap(),
                InsertOutcome::ReplacingInactive,
                "{why}, max {max}"
            );
            assert!(s.get(&r.id).await.unwrap().is_none(), "a refused insert stores nothing");
        }
    }
    // The replaced record and its replacement are judged at `limit.now`,
    // not the store's clock: `rolled` expires after it, and once its one
    // replacement has expired at `now`, `rolled` may be replaced again.
    let mut rolled = sample_record("ws_r", Some("s"), 0, false);
    rolled.expires_at = Some(t(1000));
    assert_eq!(s.insert(Arc::new(rolled.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let at =
        |now| ActiveLimit { replacing: Some(rolled.id.clone()), ..ActiveLimit::new(u32::MAX, now) };
    let mut brief = sample_record("ws_r", Some("s"), 1, false);
    brief.expires_at = Some(t(150));
    assert_eq!(
        s.insert(Arc::new(brief), Some(at(t(100)))).await.unwrap(),
        InsertOutcome::Inserted,
        "active at limit.now"
    );
    let next = sample_record("ws_r", Some("s"), 2, false);
    assert_eq!(
        s.insert(Arc::new(next), Some(at(t(150)))).await.unwrap(),
        InsertOutcome::Inserted,
        "the first replacement expired at now"
    );
    // Without a cap (`u32::MAX`), only the replaced record is checked: a
    // chain of rolls takes the project past any count.
    let mut last = again.id;
    for i in 0..3 {
        let r = sample_record("ws_r", Some("p"), 5 + i, false);
        let free = ActiveLimit { replacing: Some(last), ..ActiveLimit::new(u32::MAX, now) };
        assert_eq!(
            s.insert(Arc::new(r.clone()), Some(free)).await.unwrap(),
            InsertOutcome::Inserted
        );
        last = r.id;
    }
}

/// Duplicates are checked before the replaced record: a taken id or digest
/// is reported as such whatever the insert replaces (a revoked, an unknown,
/// or an already replaced record).
async fn duplicates_before_replaced<S: KeyStore>(s: &S) {
    let now = t(100);
    let [taken, revoked, replaced, replacement] =
        [0, 1, 2, 3].map(|i| sample_record("ws_d", Some("p"), i, false));
    for r in [&taken, &revoked, &replaced] {
        assert_eq!(s.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    }
    assert!(s.revoke(&revoked.id, t(50)).await.unwrap());
    let roll = ActiveLimit { replacing: Some(replaced.id.clone()), ..ActiveLimit::new(10, now) };
    assert_eq!(s.insert(Arc::new(replacement), Some(roll)).await.unwrap(), InsertOutcome::Inserted);
    let unknown = sample_record("ws_d", None, 0, false).id;
    let mut one_per_record_id = sample_record("ws_d", Some("p"), 4, false);
    one_per_record_id.id = taken.id.clone();
    let mut same_digest = sample_record("ws_d", Some("p"), 4, false);
    same_digest.digest = taken.digest;
    for (r, want) in [
        (one_per_record_id, InsertOutcome::DuplicateId),
        (same_digest, InsertOutcome::DuplicateKey),
    ] {
        for (old, why) in
            [(&revoked.id, "revoked"), (&unknown, "unknown"), (&replaced.id, "replaced")]
        {
            for max in [2, u32::MAX] {
                let limit =
                    ActiveLimit { replacing: Some(old.clone()), ..ActiveLimit::new(max, now) };
                assert_eq!(
                    s.insert(Arc::new(r.clone()), Some(limit)).await.unwrap(),
                    want,
                    "duplicates are checked before the replaced record ({why}, max {max})"
                );
            }
        }
    }
}

async fn listing<S: KeyStore>(store: &S) {
    let p1 = sample_record("ws_l", Some("p1"), 2, false);
    let p2 = sample_record("ws_l", Some("p2"), 1, false);
    let whole = sample_record("ws_l", None, 3, false);
    let elsewhere = sample_record("ws_other", Some("p1"), 0, false);
    for r in [&p1, &p2, &whole, &elsewhere] {
        assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    }
    let ids = |v: Vec<Arc<KeyRecord>>| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let ws = "ws_l".parse().unwrap();
    assert_eq!(
        ids(store.list(&ws, None).await.unwrap()),
        vec![p2.id.clone(), p1.id.clone(), whole.id.clone()],
        "whole workspace, oldest first"
    );
    assert_eq!(
        ids(store.list(&ws, Some(&"p1".parse().unwrap())).await.unwrap()),
        vec![p1.id.clone()]
    );
    assert!(store.list(&"ws_none".parse().unwrap(), None).await.unwrap().is_empty());
    // Revoked records are listed too, as stored.
    store.revoke(&p1.id, t(10)).await.unwrap();
    let all = store.list(&ws, None).await.unwrap();
    assert_eq!(ids(all.clone()), vec![p2.id.clone(), p1.id.clone(), whole.id.clone()]);
    assert_eq!(all[1].revoked_at, Some(t(10)), "the listing shows the revocation");
    assert_eq!(*all[0], p2, "listed records are the stored records");
}

async fn revoke_and_expiry<S: KeyStore>(s: &S) {
    let r = sample_record("ws_r", None, 0, false);
    assert_eq!(s.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(s.revoke(&r.id, t(10)).await.unwrap(), "first revoke revokes");
    assert!(!s.revoke(&r.id, t(20)).await.unwrap(), "second revoke is a no-op");
    let got = s.get(&r.id).await.unwrap().unwrap();
    assert_eq!(got.revoked_at, Some(t(10)), "first revocation time kept");
    let by_digest = s.find_by_digest(&r.digest).await.unwrap().unwrap();
    assert_eq!(by_digest.revoked_at, Some(t(10)), "revocation visible through the digest index");
    assert!(!s.revoke(&RecordId::generate().unwrap(), t(0)).await.unwrap());

    // `nk` keys authenticate through the key-id index: revocation and a
    // shortened expiry must show there too.
    let nk = sample_record("ws_r", None, 0, true);
    let kid = nk.key_id.expect("nk has a key id");
    assert_eq!(s.insert(Arc::new(nk.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(s.revoke(&nk.id, t(15)).await.unwrap());
    assert!(s.shorten_expiry(&nk.id, t(500)).await.unwrap());
    let by_kid = s.find_by_key_id("nk", &kid).await.unwrap().unwrap();
    assert_eq!(by_kid.revoked_at, Some(t(15)), "revocation visible through the key-id index");
    assert_eq!(by_kid.expires_at, Some(t(500)), "expiry visible through the key-id index");

    let e = sample_record("ws_r", None, 0, false);
    assert_eq!(s.insert(Arc::new(e.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(s.shorten_expiry(&e.id, t(100)).await.unwrap());
    assert!(s.shorten_expiry(&e.id, t(200)).await.unwrap(), "exists");
    assert_eq!(s.get(&e.id).await.unwrap().unwrap().expires_at, Some(t(100)), "never extended");
    s.shorten_expiry(&e.id, t(50)).await.unwrap();
    assert_eq!(s.get(&e.id).await.unwrap().unwrap().expires_at, Some(t(50)), "shortened");
    let by_digest = s.find_by_digest(&e.digest).await.unwrap().unwrap();
    assert_eq!(by_digest.expires_at, Some(t(50)), "expiry visible through the digest index");
    assert!(!s.shorten_expiry(&RecordId::generate().unwrap(), t(0)).await.unwrap());
}

async fn last_use<S: KeyStore>(s: &S) {
    let r = sample_record("ws_u", None, 0, false);
    assert_eq!(s.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let r2 = sample_record("ws_u", None, 1, false);
    assert_eq!(s.insert(Arc::new(r2.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let unknown = RecordId::generate().unwrap();
    s.record_last_used(&[(unknown.clone(), t(40)), (r.id.clone(), t(30)), (r2.id.clone(), t(35))])
        .await
        .unwrap();
    assert_eq!(s.get(&r.id).await.unwrap().unwrap().last_used_at, Some(t(30)));
    assert_eq!(s.get(&r2.id).await.unwrap().unwrap().last_used_at, Some(t(35)), "whole batch");
    assert!(s.get(&unknown).await.unwrap().is_none(), "last use creates no record");
    s.record_last_used(&[(r.id.clone(), t(20))]).await.unwrap();
    assert_eq!(s.get(&r.id).await.unwrap().unwrap().last_used_at, Some(t(30)), "later wins");
    s.record_last_used(&[]).await.unwrap();
    // Last use touches nothing else: a use noted before a revocation or a
    // roll's grace, written after it, leaves the key ended.
    assert!(s.revoke(&r.id, t(40)).await.unwrap());
    assert!(s.shorten_expiry(&r2.id, t(45)).await.unwrap());
    s.record_last_used(&[(r.id.clone(), t(41)), (r2.id.clone(), t(46))]).await.unwrap();
    let (revoked, shortened) =
        (s.get(&r.id).await.unwrap().unwrap(), s.get(&r2.id).await.unwrap().unwrap());
    assert_eq!(revoked.revoked_at, Some(t(40)), "last use leaves the revocation");
    assert_eq!(shortened.expires_at, Some(t(45)), "last use leaves the shortened expiry");
    assert_eq!((revoked.last_used_at, shortened.last_used_at), (Some(t(41)), Some(t(46))));
}

/// Races `threads` threads against the atomicity the contract promises:
/// each round, every thread inserts its own record into one project capped
/// at `max` active keys, then every thread inserts a record with one
/// shared digest, one with a shared (format, key id) and one with a shared
/// record id, and then every thread inserts a replacement of one shared
/// record (two rolls of one key racing). Exactly `max` capped inserts,
/// exactly one insert of each shared digest, key id and record id, and
/// exactly one of the replacements may succeed (the others are
/// [`InsertOutcome::AlreadyReplaced`]).
///
/// Threads drive the futures with [`block_on`](super::portal::block_on),
/// as the portal race does, each the suite's own, outside any runtime: it
/// may be called from async code as from a plain test, and a store whose
/// futures need a runtime's context (`tokio::spawn`, `spawn_blocking`, its
/// timers) must hold a `Handle` and spawn through it.
///
/// # Panics
///
/// When more (or fewer) inserts succeed than the contract allows.
pub fn race<S: KeyStore + Sync>(store: &S, rounds: usize, threads: usize, max: u32) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cap = usize::try_from(max).unwrap_or(usize::MAX);
    assert!(cap < threads, "more threads than the cap, or the cap is never contended");
    clear_of_the_hour();
    for round in 0..rounds {
        let project = format!("race{round}");
        let limit = ActiveLimit::new(max, t(100));
        let capped = AtomicUsize::new(0);
        let shared = sample_record("ws_race", None, 0, false).digest;
        let same_digest = AtomicUsize::new(0);
        let shared_kid = sample_record("ws_race", None, 0, true).key_id;
        let same_kid = AtomicUsize::new(0);
        let taken_record_id = RecordId::generate().expect("OS RNG");
        let one_per_record_id = AtomicUsize::new(0);
        let rolled = sample_record("ws_race", Some(&format!("rolled{round}")), 0, false);
        let roll = ActiveLimit {
            replacing: Some(rolled.id.clone()),
            ..ActiveLimit::new(u32::MAX, t(100))
        };
        let inserted = super::portal::block_on_apart(|| store.insert(Arc::new(rolled), None));
        assert_eq!(
            inserted.expect("insert"),
            InsertOutcome::Inserted,
            "round {round}: the rolled key"
        );
        let replacements = AtomicUsize::new(0);
        let barrier = super::portal::RaceBarrier::new(threads);
        std::thread::scope(|sc| {
            for _ in 0..threads {
                let (capped, same_digest, barrier, project, limit) =
                    (&capped, &same_digest, &barrier, &project, &limit);
                let (replacements, roll) = (&replacements, &roll);
                let (same_kid, one_per_record_id, taken_record_id) =
                    (&same_kid, &one_per_record_id, &taken_record_id);
                sc.spawn(move || {
                    let _member = barrier.member();
                    let mine = sample_record("ws_race", Some(project), 0, false);
                    barrier.wait();
                    let won =
                        super::portal::block_on(store.insert(Arc::new(mine), Some(limit.clone())));
                    if won.expect("insert") == InsertOutcome::Inserted {
                        capped.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut dup = sample_record("ws_race", None, 0, false);
                    dup.digest = shared;
                    barrier.wait();
                    let won = super::portal::block_on(store.insert(Arc::new(dup), None));
                    if won.expect("insert") == InsertOutcome::Inserted {
                        same_digest.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut dup = sample_record("ws_race", None, 0, true);
                    dup.key_id = shared_kid;
                    barrier.wait();
                    let won = super::portal::block_on(store.insert(Arc::new(dup), None));
                    if won.expect("insert") == InsertOutcome::Inserted {
                        same_kid.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut dup = sample_record("ws_race", None, 0, false);
                    dup.id = taken_record_id.clone();
                    barrier.wait();
                    let won = super::portal::block_on(store.insert(Arc::new(dup), None));
                    if won.expect("insert") == InsertOutcome::Inserted {
                        one_per_record_id.fetch_add(1, Ordering::Relaxed);
                    }
                    let replacement =
                        sample_record("ws_race", Some(&format!("rolled{round}")), 1, false);
                    barrier.wait();
                    let won = super::portal::block_on(
                        store.insert(Arc::new(replacement), Some(roll.clone())),
                    );
                    match won.expect("insert") {
                        InsertOutcome::Inserted => {
                            replacements.fetch_add(1, Ordering::Relaxed);
                        }
                        InsertOutcome::AlreadyReplaced => {}
                        other => panic!("round {round}: a losing roll answered {other:?}"),
                    }
                });
            }
        });
        assert_eq!(capped.into_inner(), cap, "round {round}: the cap admits exactly {cap}");
        assert_eq!(same_digest.into_inner(), 1, "round {round}: one insert per digest");
        assert_eq!(same_kid.into_inner(), 1, "round {round}: one insert per key id");
        assert_eq!(one_per_record_id.into_inner(), 1, "round {round}: one insert per record id");
        assert_eq!(
            replacements.into_inner(),
            1,
            "round {round}: one replacement per record (two rolls of one key racing)"
        );
    }
}
