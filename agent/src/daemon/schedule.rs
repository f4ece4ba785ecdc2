//! When backups are due: pure functions of the config and a clock, so DST and catch-up
//! are unit-tested without waiting.

use std::collections::BTreeMap;

use dr_core::config::DatabaseConfig;
use jiff::{Timestamp, Zoned};

/// One scheduled run: the instant and every class whose schedule fires at it (one dump
/// serves all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub at: Zoned,
    pub classes: Vec<String>,
}

/// The first instant strictly after `after` at which any schedule of `db` fires.
pub fn next_slot(db: &DatabaseConfig, after: &Zoned) -> Option<Slot> {
    let mut fires: Vec<(Zoned, String)> = db
        .schedules
        .iter()
        .filter_map(|s| {
            s.cron
                .next_runs(after, 1)
                .into_iter()
                .next()
                .map(|at| (at, s.class.to_string()))
        })
        .collect();
    fires.sort_by(|a, b| a.0.cmp(&b.0));
    let first = fires.first()?.0.clone();
    let classes = fires
        .into_iter()
        .filter(|(at, _)| at.timestamp() == first.timestamp())
        .map(|(_, c)| c)
        .collect();
    Some(Slot { at: first, classes })
}

/// How many fires of one schedule a single check looks at; past this, the rest of the
/// window is summed up as "at least" this many.
const MAX_FIRES: usize = 10_000;

/// One class whose schedule fired in a window: its latest fire and how often it fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueClass {
    pub class: String,
    pub last: Zoned,
    pub fires: usize,
}

/// Every slot strictly after `handled` and at or before `now`, merged into one run: each
/// class whose schedule fired in that window (in schedule order). Slots that fell while an
/// earlier job ran are in it, so none is dropped.
pub fn due(db: &DatabaseConfig, handled: &Zoned, now: &Zoned) -> Vec<DueClass> {
    db.schedules
        .iter()
        .filter_map(|s| {
            let fires = s.cron.runs_between(handled, now, MAX_FIRES);
            let mut last = fires.last()?.clone();
            if fires.len() == MAX_FIRES {
                last = s.cron.previous_run(now).unwrap_or(last);
            }
            Some(DueClass {
                class: s.class.to_string(),
                last,
                fires: fires.len(),
            })
        })
        .collect()
}

/// Classes whose most recent scheduled run (at or before `now`) has no backup since:
/// what a catch-up backup should count as.
pub fn missed_classes(
    db: &DatabaseConfig,
    newest_per_class: &BTreeMap<String, Timestamp>,
    now: &Zoned,
) -> Vec<String> {
    db.schedules
        .iter()
        .filter(|s| {
            let Some(prev) = s.cron.previous_run(now) else {
                return false;
            };
            newest_per_class
                .get(s.class.as_str())
                .is_none_or(|last| *last < prev.timestamp())
        })
        .map(|s| s.class.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(schedules: &[(&str, &str)]) -> DatabaseConfig {
        let mut text = String::from("name = \"app\"\nurl = \"postgres://u@h/app\"\n");
        for (class, cron) in schedules {
            text.push_str(&format!(
                "[[schedules]]\nclass = \"{class}\"\ncron = \"{cron}\"\nkeep = \"30d\"\n"
            ));
        }
        toml::from_str(&text).unwrap()
    }

    fn at(tz: &str, s: &str) -> Zoned {
        s.parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::get(tz).unwrap())
            .unwrap()
    }

    #[test]
    fn classes_due_together_share_one_slot() {
        let d = db(&[("daily", "0 4 * * *"), ("monthly", "0 4 1 * *")]);
        let slot = next_slot(&d, &at("UTC", "2026-11-30T12:00:00")).unwrap();
        assert_eq!(slot.at, at("UTC", "2026-12-01T04:00:00"));
        assert_eq!(slot.classes, vec!["daily", "monthly"]);
        let slot = next_slot(&d, &slot.at).unwrap();
        assert_eq!(slot.classes, vec!["daily"]);
    }

    #[test]
    fn dst_spring_forward_runs_once_and_fall_back_runs_once() {
        let d = db(&[("daily", "30 2 * * *")]);
        // 2026-03-29 02:30 does not exist in Berlin.
        let mut t = at("Europe/Berlin", "2026-03-28T12:00:00");
        let mut days = Vec::new();
        for _ in 0..3 {
            let s = next_slot(&d, &t).unwrap();
            days.push(s.at.date());
            t = s.at;
        }
        assert_eq!(
            days,
            vec![
                jiff::civil::date(2026, 3, 29),
                jiff::civil::date(2026, 3, 30),
                jiff::civil::date(2026, 3, 31)
            ]
        );
        // 2026-10-25 02:30 happens twice in Berlin: one run.
        let mut t = at("Europe/Berlin", "2026-10-24T12:00:00");
        let mut runs = Vec::new();
        for _ in 0..2 {
            let s = next_slot(&d, &t).unwrap();
            runs.push(s.at.date());
            t = s.at;
        }
        assert_eq!(
            runs,
            vec![
                jiff::civil::date(2026, 10, 25),
                jiff::civil::date(2026, 10, 26)
            ]
        );
    }

    #[test]
    fn missed_slots_name_the_classes_to_catch_up() {
        let d = db(&[("daily", "0 3 * * *"), ("monthly", "0 4 1 * *")]);
        let now = at("UTC", "2026-12-02T12:00:00");
        let mut newest = BTreeMap::new();
        newest.insert("daily".to_string(), "2026-12-02T03:00:05Z".parse().unwrap());
        newest.insert(
            "monthly".to_string(),
            "2026-11-01T04:00:05Z".parse().unwrap(),
        );
        assert_eq!(missed_classes(&d, &newest, &now), vec!["monthly"]);
        assert_eq!(
            missed_classes(&d, &BTreeMap::new(), &now),
            vec!["daily", "monthly"]
        );
    }

    #[test]
    fn seconds_field_supports_fast_test_schedules() {
        let d = db(&[("daily", "*/5 * * * * *")]);
        let s = next_slot(&d, &at("UTC", "2026-11-23T10:00:01")).unwrap();
        assert_eq!(s.at, at("UTC", "2026-11-23T10:00:05"));
    }

    #[test]
    fn a_slot_that_falls_during_a_long_job_is_still_due_after_it() {
        // A daily job from 04:00 runs past 04:00 on the 1st, when the monthly fires.
        let d = db(&[("daily", "0 3 * * *"), ("monthly", "0 4 1 * *")]);
        let handled = at("UTC", "2026-12-01T03:00:00");
        let after_job = at("UTC", "2026-12-01T05:30:00");
        let due = due(&d, &handled, &after_job);
        assert_eq!(
            due,
            vec![DueClass {
                class: "monthly".into(),
                last: at("UTC", "2026-12-01T04:00:00"),
                fires: 1
            }]
        );
        // Nothing fell in the window: nothing due, the loop sleeps until the next slot.
        assert!(super::due(&d, &after_job, &at("UTC", "2026-12-01T12:00:00")).is_empty());
    }

    #[test]
    fn slots_missed_during_a_very_long_job_merge_into_one_run() {
        // A job that ran for two and a half days: two dailies and a monthly fell.
        let d = db(&[("daily", "0 3 * * *"), ("monthly", "0 4 1 * *")]);
        let handled = at("UTC", "2026-11-30T03:00:00");
        let now = at("UTC", "2026-12-02T15:00:00");
        let due = due(&d, &handled, &now);
        let classes: Vec<(&str, usize)> = due.iter().map(|c| (c.class.as_str(), c.fires)).collect();
        assert_eq!(classes, vec![("daily", 2), ("monthly", 1)]);
        assert_eq!(due[0].last, at("UTC", "2026-12-02T03:00:00"));
    }

    #[test]
    fn the_handled_slot_itself_is_not_due_again() {
        let d = db(&[("daily", "*/5 * * * * *")]);
        let handled = at("UTC", "2026-11-23T10:00:05");
        assert!(due(&d, &handled, &handled).is_empty());
        assert!(due(&d, &handled, &at("UTC", "2026-11-23T10:00:09")).is_empty());
        let due = due(&d, &handled, &at("UTC", "2026-11-23T10:00:10"));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].last, at("UTC", "2026-11-23T10:00:10"));
    }
}
