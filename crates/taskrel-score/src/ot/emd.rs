//! Exact optimal transport (earth mover's distance) by the primal network simplex method on
//! the bipartite transportation graph.
//!
//! Problem: minimise `sum_ij C_ij x_ij` subject to `sum_j x_ij = a_i`, `sum_i x_ij = b_j`,
//! `x >= 0`, with `C` dense `(n, m)` row-major and `sum a = sum b` (checked to a relative 1e-9,
//! then `b` is rescaled to sum exactly to `sum a`).
//!
//! The basis is a spanning tree of the `n + m` nodes (sources `0..n`, sinks `n..n+m`), stored
//! as parent pointers with depths, children as doubly linked sibling lists (constant-time
//! relinking, subtrees walked without a stack), the flow of each tree edge at its child, and
//! node potentials `u` (sources) and `v` (sinks) with `C_ij = u_i + v_j` on tree edges. The
//! start is the north-west-corner staircase (a spanning tree by construction) with the sinks
//! ordered by a greedy nearest-neighbour matching. Entering arcs are priced by block search
//! (blocks of about `sqrt(n m)` arcs scanned cyclically, the most negative reduced cost of the
//! first block that has one enters, the first such arc on ties; each run of a block along one
//! row is priced in eight vector lanes, compiled for the CPU's vector width at run time, which
//! choose exactly the arc an ordered scan would), the cycle is found by
//! walking both ends up to their common ancestor, and the detached subtree is re-rooted at the
//! entering arc with its potentials shifted by the entering reduced cost.
//!
//! [`emd_labelled`] solves the problem task-relatedness poses, a Euclidean cost plus a large
//! weight times a cost between class labels, without pricing (or computing) most of its arcs:
//! the class pairs an optimal plan can use come from the small problem between the classes'
//! masses; only their arcs are priced, and when no priced arc improves, every other class
//! pair is checked against a lower bound on its reduced costs (its label cost, the Euclidean
//! part being at least 0) and joins the priced arcs only when the bound does not clear it. Its
//! start is the least-cost (matrix-minimum) rule within the class plan, made a spanning tree
//! with zero-flow arcs. It
//! stops only when every arc of the whole problem has a reduced cost above `-eps`, so the plan
//! is optimal for the whole problem, as [`emd`]'s is.

use std::borrow::Cow;

use crate::{Error, Result};

/// An optimal transport plan in sparse form.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// `sum_ij C_ij x_ij`.
    pub cost: f64,
    /// Basic arcs `(i, j, x_ij)`; arcs not listed carry no mass (zero-mass basic arcs are
    /// dropped).
    pub flows: Vec<(u32, u32, f64)>,
    /// Simplex pivots performed.
    pub pivots: usize,
}

impl Plan {
    /// Row sums `(n)` of the plan.
    pub fn row_sums(&self, n: usize) -> Vec<f64> {
        let mut s = vec![0.0; n];
        for &(i, _, x) in &self.flows {
            s[i as usize] += x;
        }
        s
    }

    /// Column sums `(m)` of the plan.
    pub fn col_sums(&self, m: usize) -> Vec<f64> {
        let mut s = vec![0.0; m];
        for &(_, j, x) in &self.flows {
            s[j as usize] += x;
        }
        s
    }
}

/// Checks weights: finite, non-negative, equal totals.
pub(crate) fn check_marginals(a: &[f64], b: &[f64]) -> Result<(f64, f64)> {
    for (name, w) in [("source", a), ("target", b)] {
        if w.is_empty() {
            return Err(Error::Invalid(format!(
                "optimal transport: {name} weights are empty"
            )));
        }
        if let Some(bad) = w.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(Error::Invalid(format!(
                "optimal transport: {name} weight {bad} is {}",
                w[bad]
            )));
        }
    }
    let (sa, sb): (f64, f64) = (a.iter().sum(), b.iter().sum());
    if sa.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || ((sa - sb) / sa).abs() > 1e-9 {
        return Err(Error::Invalid(format!(
            "optimal transport: weights sum to {sa} and {sb}, expected equal positive totals"
        )));
    }
    Ok((sa, sb))
}

/// Solves the transportation problem exactly. `cost` is `(a.len(), b.len())` row-major.
pub fn emd(a: &[f64], b: &[f64], cost: &[f64]) -> Result<Plan> {
    let (n, m) = (a.len(), b.len());
    let (sa, sb) = check_marginals(a, b)?;
    if cost.len() != n * m {
        return Err(Error::Invalid(format!(
            "optimal transport: cost has {} entries, expected {n} x {m}",
            cost.len()
        )));
    }
    if let Some(bad) = cost.iter().position(|c| !c.is_finite()) {
        return Err(Error::Invalid(format!(
            "optimal transport: cost ({}, {}) is {}",
            bad / m,
            bad % m,
            cost[bad]
        )));
    }
    let b: Vec<f64> = b.iter().map(|x| x * sa / sb).collect();
    let runs: Vec<Run> = (0..n).map(|i| (i, 0, m)).collect();
    let order = nearest_neighbour_order(cost, n, m);
    let tree = staircase(a, &b, &order);
    let scale = cost.iter().fold(0.0f64, |acc, c| acc.max(c.abs()));
    let mut s = Simplex::new(n, m, Cow::Borrowed(cost), scale);
    s.set_tree(&tree);
    s.solve(&runs);
    Ok(s.plan())
}

/// A transport problem between labelled point clouds whose cost between `x_i` (class `c_i`)
/// and `y_l` (class `c'_l`) is `||x_i - y_l|| + weight * label_cost[c_i, c'_l]`.
#[derive(Clone, Copy, Debug)]
pub struct Labelled<'a> {
    /// Points `(n, dim)`, row-major.
    pub x: &'a [f32],
    /// Points `(m, dim)`, row-major.
    pub y: &'a [f32],
    pub dim: usize,
    /// Class of each row of `x`, below `label_cost`'s row count.
    pub x_classes: &'a [u32],
    /// Class of each row of `y`, below `label_cost`'s column count.
    pub y_classes: &'a [u32],
    /// `(x classes, y classes)` row-major.
    pub label_cost: &'a [f64],
    pub y_class_count: usize,
    pub weight: f64,
}

/// Memory that [`emd_labelled_in`] keeps from one problem to the next: the dense cost matrix,
/// of which a problem writes every entry it reads and no other, so it is not cleared between
/// problems (a 500 x 500 problem would clear 2 MB).
#[derive(Debug, Default)]
pub struct LabelledScratch {
    cost: Vec<f64>,
}

/// Solves the transportation problem of [`Labelled`] exactly, as [`emd`] does on the dense cost
/// matrix, computing the Euclidean part only for the class pairs it has to (module docs).
pub fn emd_labelled(a: &[f64], b: &[f64], p: &Labelled) -> Result<Plan> {
    emd_labelled_in(&mut LabelledScratch::default(), a, b, p)
}

/// [`emd_labelled`] with its cost matrix kept in `scratch`, for a caller that solves many
/// problems in a row. The plan does not depend on what `scratch` held before.
pub fn emd_labelled_in<'a>(
    scratch: &mut LabelledScratch,
    a: &[f64],
    b: &[f64],
    p: &Labelled<'a>,
) -> Result<Plan> {
    let (n, m, d) = (a.len(), b.len(), p.dim.max(1));
    let (sa, sb) = check_marginals(a, b)?;
    let ky = p.y_class_count.max(1);
    let kx = p.label_cost.len() / ky;
    let invalid = |what: String| Err(Error::Invalid(format!("optimal transport: {what}")));
    if p.label_cost.len() != kx * ky || kx == 0 {
        return invalid(format!(
            "label cost has {} entries, not a multiple of {ky} target classes",
            p.label_cost.len()
        ));
    }
    if !(p.weight.is_finite() && p.weight >= 0.0) || p.label_cost.iter().any(|c| !c.is_finite()) {
        return invalid(format!(
            "label costs must be finite and the weight finite and non-negative (weight {})",
            p.weight
        ));
    }
    for (name, points, classes, rows, k) in [
        ("source", p.x, p.x_classes, n, kx),
        ("target", p.y, p.y_classes, m, ky),
    ] {
        if points.len() != rows * d || classes.len() != rows {
            return invalid(format!(
                "{rows} {name} weights but {} values of dimension {d} and {} classes",
                points.len(),
                classes.len()
            ));
        }
        if let Some(bad) = classes.iter().position(|&c| c as usize >= k) {
            return invalid(format!(
                "{name} point {bad} has class {}, expected below {k}",
                classes[bad]
            ));
        }
        if let Some(bad) = first_non_finite(points) {
            return invalid(format!(
                "{name} point {} has a non-finite coordinate",
                bad / d
            ));
        }
    }
    // Rows and columns sorted by class (stably), so that each class pair is one block.
    let sorted = |classes: &[u32]| {
        let mut order: Vec<usize> = (0..classes.len()).collect();
        order.sort_by_key(|&i| classes[i]);
        order
    };
    let (ro, co) = (sorted(p.x_classes), sorted(p.y_classes));
    // Points already in class order (as batches drawn class by class are) are not copied.
    let gather = |points: &'a [f32], order: &[usize]| -> Cow<'a, [f32]> {
        if order.iter().enumerate().all(|(pos, &i)| pos == i) {
            return Cow::Borrowed(points);
        }
        let mut out = Vec::with_capacity(order.len() * d);
        for &i in order {
            out.extend_from_slice(&points[i * d..(i + 1) * d]);
        }
        Cow::Owned(out)
    };
    let (xs, ys) = (gather(p.x, &ro), gather(p.y, &co));
    let a_s: Vec<f64> = ro.iter().map(|&i| a[i]).collect();
    let b_s: Vec<f64> = co.iter().map(|&j| b[j] * sa / sb).collect();
    let ranges = |classes: &[u32], order: &[usize], k: usize| {
        let mut r = vec![(0usize, 0usize); k];
        for (pos, &i) in order.iter().enumerate() {
            let c = classes[i] as usize;
            if r[c].1 == 0 {
                r[c].0 = pos;
            }
            r[c].1 = pos + 1;
        }
        r
    };
    let (rr, cr) = (ranges(p.x_classes, &ro, kx), ranges(p.y_classes, &co, ky));
    let mass = |w: &[f64], r: &[(usize, usize)]| -> Vec<f64> {
        r.iter().map(|&(s, e)| w[s..e].iter().sum()).collect()
    };
    let (ma, mb) = (mass(&a_s, &rr), mass(&b_s, &cr));
    // The class pairs an optimal plan between the class masses uses are priced first.
    let cx: Vec<usize> = (0..kx).filter(|&j| ma[j] > 0.0).collect();
    let cy: Vec<usize> = (0..ky).filter(|&k| mb[k] > 0.0).collect();
    let class_cost: Vec<f64> = cx
        .iter()
        .flat_map(|&j| cy.iter().map(move |&k| p.label_cost[j * ky + k]))
        .collect();
    let class_plan = emd(
        &cx.iter().map(|&j| ma[j]).collect::<Vec<_>>(),
        &cy.iter().map(|&k| mb[k]).collect::<Vec<_>>(),
        &class_cost,
    )?;
    let mut known = vec![false; kx * ky];
    for &(j, k, _) in &class_plan.flows {
        known[cx[j as usize] * ky + cy[k as usize]] = true;
    }
    // Entries of pairs not yet `known` are never read (and may hold an earlier problem's).
    let mut cost = std::mem::take(&mut scratch.cost);
    cost.resize(n * m, 0.0);
    // Fills the blocks of `pairs` in place and returns their largest cost. Rows are sorted by
    // class, so each class's rows are one stretch of `cost`; the stretches are filled on all
    // cores, each by one task.
    let fill = |cost: &mut [f64], pairs: &[(usize, usize)]| -> f64 {
        use rayon::prelude::*;
        let mut stretches: Vec<(usize, &mut [f64])> = Vec::new();
        let (mut rest, mut at) = (cost, 0);
        for (j, &(r0, r1)) in rr.iter().enumerate() {
            if r0 == r1 || !pairs.iter().any(|&(pj, _)| pj == j) {
                continue;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r0 * m - at);
            let (rows, tail) = tail.split_at_mut((r1 - r0) * m);
            stretches.push((j, rows));
            (rest, at) = (tail, r1 * m);
        }
        stretches
            .into_par_iter()
            .map(|(j, rows)| {
                let (r0, r1) = rr[j];
                let mut largest = 0.0f64;
                for &(_, k) in pairs.iter().filter(|&&(pj, _)| pj == j) {
                    let (c0, c1) = cr[k];
                    if c0 < c1 {
                        largest = largest.max(super::euclidean_into(
                            &xs[r0 * d..r1 * d],
                            &ys[c0 * d..c1 * d],
                            d,
                            &mut rows[c0..],
                            m,
                            p.weight * p.label_cost[j * ky + k],
                        ));
                    }
                }
                largest
            })
            .reduce(|| 0.0, f64::max)
    };
    let runs_of = |known: &[bool]| {
        let mut runs: Vec<Run> = Vec::new();
        for (j, &(r0, r1)) in rr.iter().enumerate() {
            for i in r0..r1 {
                for (k, &(c0, c1)) in cr.iter().enumerate() {
                    if !known[j * ky + k] || c0 == c1 {
                        continue;
                    }
                    match runs.last_mut() {
                        Some(last) if last.0 == i && last.2 == c0 => last.2 = c1,
                        _ => runs.push((i, c0, c1)),
                    }
                }
            }
        }
        runs
    };
    let pairs = |known: &[bool]| -> Vec<(usize, usize)> {
        (0..kx)
            .flat_map(|j| (0..ky).map(move |k| (j, k)))
            .filter(|&(j, k)| known[j * ky + k])
            .collect()
    };
    let mut scale = fill(&mut cost, &pairs(&known));
    let mut runs = runs_of(&known);
    // The start: the least-cost rule within the class plan. The cheapest priced arc whose row
    // and column have mass left, in a class pair with quota left, takes all the mass its row
    // or its column has left, until no such arc remains; the rest is placed north-west-corner.
    // It starts close to the label part's optimum and, within it, to the Euclidean one: about
    // 2,700 pivots on the loop benchmark's problems, 4,300 from a row-by-row nearest-neighbour
    // start.
    let mut quota = vec![0.0; kx * ky];
    for &(j, k, f) in &class_plan.flows {
        quota[cx[j as usize] * ky + cy[k as usize]] = f;
    }
    let class_of_row = |i: usize| p.x_classes[ro[i]] as usize;
    let class_of_col = |l: usize| p.y_classes[co[l]] as usize;
    let (mut rem_a, mut rem_b) = (a_s.clone(), b_s.clone());
    // Columns without mass left get the potential -inf, so that pricing with zero row
    // potentials finds the cheapest column with mass left.
    let mut blocked = vec![0.0; m];
    // The cheapest column of row i with mass left, in a class pair with quota left (the first
    // on ties), as a heap entry.
    let cheapest = |i: usize, blocked: &[f64], quota: &[f64]| {
        let j = class_of_row(i);
        let mut best = (f64::INFINITY, NONE);
        for (k, &(c0, c1)) in cr.iter().enumerate() {
            if known[j * ky + k] && quota[j * ky + k] > 0.0 {
                price_run(
                    &cost[i * m + c0..i * m + c1],
                    &blocked[c0..c1],
                    0.0,
                    c0,
                    &mut best,
                );
            }
        }
        // Costs are non-negative, so their bit patterns order as they do.
        (best.1 != NONE).then(|| std::cmp::Reverse((best.0.to_bits(), i, best.1)))
    };
    let mut tree: Vec<(usize, usize, f64)> = Vec::with_capacity(n + m - 1);
    let mut heap: std::collections::BinaryHeap<_> = (0..n)
        .filter_map(|i| cheapest(i, &blocked, &quota))
        .collect();
    while let Some(std::cmp::Reverse((_, i, l))) = heap.pop() {
        let at = class_of_row(i) * ky + class_of_col(l);
        if rem_b[l] > 0.0 && quota[at] > 0.0 {
            let x = rem_a[i].min(rem_b[l]);
            rem_a[i] -= x;
            rem_b[l] -= x;
            quota[at] -= x;
            if rem_b[l] <= 0.0 {
                blocked[l] = f64::NEG_INFINITY;
            }
            tree.push((i, l, x));
        }
        if rem_a[i] > 0.0 {
            heap.extend(cheapest(i, &blocked, &quota));
        }
    }
    // Mass the greedy could not place goes north-west-corner over the rows and columns left.
    let rows_left: Vec<usize> = (0..n).filter(|&i| rem_a[i] > 0.0).collect();
    let cols_left: Vec<usize> = (0..m).filter(|&l| rem_b[l] > 0.0).collect();
    let (mut ri, mut ci) = (0, 0);
    while ri < rows_left.len() && ci < cols_left.len() {
        let (i, l) = (rows_left[ri], cols_left[ci]);
        let x = rem_a[i].min(rem_b[l]);
        rem_a[i] -= x;
        rem_b[l] -= x;
        tree.push((i, l, x));
        if rem_a[i] <= 0.0 {
            ri += 1;
        } else {
            ci += 1;
        }
    }
    // Every arc exhausted a row or a column no later arc touches, so the arcs form a forest;
    // zero-flow arcs join its trees into a spanning tree.
    let mut root: Vec<usize> = (0..n + m).collect();
    fn find(root: &mut [usize], mut v: usize) -> usize {
        while root[v] != v {
            root[v] = root[root[v]];
            v = root[v];
        }
        v
    }
    for &(i, l, _) in &tree {
        let (x, y) = (find(&mut root, i), find(&mut root, n + l));
        root[x] = y;
    }
    for v in (n..n + m).chain(1..n) {
        let (x, y) = (find(&mut root, v), find(&mut root, 0));
        if x != y {
            // Source 0 and sink 0 are joined first (v = n), so both anchor the others.
            tree.push(if v < n { (v, 0, 0.0) } else { (0, v - n, 0.0) });
            root[x] = y;
        }
    }
    for &(i, l, _) in &tree {
        let at = class_of_row(i) * ky + class_of_col(l);
        if !known[at] {
            cost[i * m + l] = distance(&xs[i * d..(i + 1) * d], &ys[l * d..(l + 1) * d])
                + p.weight * p.label_cost[at];
            scale = scale.max(cost[i * m + l]);
        }
    }
    let mut s = Simplex::new(n, m, Cow::Owned(cost), scale);
    s.set_tree(&tree);
    loop {
        s.solve(&runs);
        // Every arc of a pair not priced costs at least its weighted label cost.
        let (u, v) = s.pot.split_at(n);
        let mut max_u = vec![f64::NEG_INFINITY; kx];
        for (i, &ui) in u.iter().enumerate() {
            let c = class_of_row(i);
            max_u[c] = max_u[c].max(ui);
        }
        let mut max_v = vec![f64::NEG_INFINITY; ky];
        for (l, &vl) in v.iter().enumerate() {
            let c = class_of_col(l);
            max_v[c] = max_v[c].max(vl);
        }
        let mut added = Vec::new();
        for (j, k) in (0..kx).flat_map(|j| (0..ky).map(move |k| (j, k))) {
            let at = j * ky + k;
            if known[at] || max_u[j] == f64::NEG_INFINITY || max_v[k] == f64::NEG_INFINITY {
                continue;
            }
            if p.weight * p.label_cost[at] - max_u[j] - max_v[k] < -s.eps {
                known[at] = true;
                added.push((j, k));
            }
        }
        if added.is_empty() {
            break;
        }
        fill(s.cost.to_mut(), &added);
        runs = runs_of(&known);
    }
    let mut plan = s.plan();
    scratch.cost = s.cost.into_owned();
    for f in &mut plan.flows {
        *f = (ro[f.0 as usize] as u32, co[f.1 as usize] as u32, f.2);
    }
    plan.flows.sort_by_key(|&(i, j, _)| (i, j));
    Ok(plan)
}

/// The position of the first non-finite value. Eight lanes add `0 * v`, which stays 0 unless
/// some `v` is infinite or NaN (the loop vectorises); only then are the values searched.
fn first_non_finite(values: &[f32]) -> Option<usize> {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += 0.0 * v;
        }
    }
    let clean = lanes.iter().chain(tail).all(|v| v.is_finite());
    if clean {
        None
    } else {
        values.iter().position(|v| !v.is_finite())
    }
}

/// `||x - y||` summed in f32 in dimension order, as [`super::euclidean`] sums it.
fn distance(x: &[f32], y: &[f32]) -> f64 {
    let mut sum = 0f32;
    for (&a, &b) in x.iter().zip(y) {
        let t = a - b;
        sum += t * t;
    }
    f64::from(sum).sqrt()
}

/// Columns `start..end` of one row: a stretch of arcs that pricing reads in order.
type Run = (usize, usize, usize);

/// The sinks in greedy nearest-neighbour order: each source in turn takes the cheapest sink
/// not yet taken; sinks left over follow in index order. Any order gives a feasible staircase;
/// this one starts near a good matching, which saves pivots.
fn nearest_neighbour_order(cost: &[f64], n: usize, m: usize) -> Vec<usize> {
    let mut taken = vec![false; m];
    let mut order = Vec::with_capacity(m);
    for row in cost.chunks_exact(m).take(n.min(m)) {
        let mut best = (f64::INFINITY, NONE);
        for (j, &c) in row.iter().enumerate() {
            if !taken[j] && c < best.0 {
                best = (c, j);
            }
        }
        if best.1 != NONE {
            taken[best.1] = true;
            order.push(best.1);
        }
    }
    order.extend((0..m).filter(|&j| !taken[j]));
    order
}

/// The north-west-corner staircase over the sources in index order and the sinks in `order`:
/// `n + m - 1` arcs `(i, j, flow)` forming a spanning tree that meets both marginals.
fn staircase(a: &[f64], b: &[f64], order: &[usize]) -> Vec<(usize, usize, f64)> {
    let (n, m) = (a.len(), b.len());
    let mut arcs = Vec::with_capacity(n + m - 1);
    let (mut i, mut q) = (0, 0);
    let (mut ra, mut rb) = (a[0], b[order[0]]);
    loop {
        let j = order[q];
        let x = ra.min(rb).max(0.0);
        arcs.push((i, j, x));
        ra -= x;
        rb -= x;
        if i == n - 1 && q == m - 1 {
            return arcs;
        }
        if q == m - 1 || (i < n - 1 && ra <= rb) {
            i += 1;
            ra = a[i];
        } else {
            q += 1;
            rb = b[order[q]];
        }
    }
}

struct Simplex<'c> {
    n: usize,
    m: usize,
    // Dense `(n, m)`; entries outside the priced runs may be unknown (NaN) and are never read.
    cost: Cow<'c, [f64]>,
    parent: Vec<usize>,
    depth: Vec<u32>,
    flow: Vec<f64>,
    // Children of a node: `first_child`, then `next_sibling` links (`prev_sibling` back).
    first_child: Vec<usize>,
    next_sibling: Vec<usize>,
    prev_sibling: Vec<usize>,
    pot: Vec<f64>,
    pivots: usize,
    eps: f64,
    // Scratch space of `pivot`, kept between pivots.
    up_snk: Vec<usize>,
    up_src: Vec<usize>,
}

const NONE: usize = usize::MAX;

struct Solve<'s, 'c, 'r>(&'s mut Simplex<'c>, &'r [Run]);

impl pulp::NullaryFnOnce for Solve<'_, '_, '_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        self.0.solve_body(self.1);
    }
}

/// Prices the arcs `first..first + costs.len()` of one row (`costs` and the sinks' potentials
/// `v` side by side, the row's potential `ui`): `best` becomes the most negative reduced cost
/// `c - ui - v_j` below it and its arc, the first such arc on ties, exactly as a scan in order
/// would leave it. Eight lanes keep their own minimum (the loop vectorises), then merge.
#[inline(always)]
fn price_run(costs: &[f64], v: &[f64], ui: f64, first: usize, best: &mut (f64, usize)) {
    const L: usize = 8;
    let mut value = [best.0; L];
    let mut arc = [NONE; L];
    let (cost_chunks, v_chunks) = (costs.chunks_exact(L), v.chunks_exact(L));
    let (cost_tail, v_tail) = (cost_chunks.remainder(), v_chunks.remainder());
    for (c, (cs, vs)) in cost_chunks.zip(v_chunks).enumerate() {
        for l in 0..L {
            let rc = cs[l] - ui - vs[l];
            let better = rc < value[l];
            value[l] = if better { rc } else { value[l] };
            arc[l] = if better { c * L + l } else { arc[l] };
        }
    }
    // Lanes that improved hold values below `best.0`; the smallest wins, the lowest arc on ties.
    for l in 0..L {
        if arc[l] != NONE && (value[l] < best.0 || (value[l] == best.0 && first + arc[l] < best.1))
        {
            *best = (value[l], first + arc[l]);
        }
    }
    let tail_start = costs.len() - cost_tail.len();
    for (q, (&c, &vj)) in cost_tail.iter().zip(v_tail).enumerate() {
        let rc = c - ui - vj;
        if rc < best.0 {
            *best = (rc, first + tail_start + q);
        }
    }
}

impl<'c> Simplex<'c> {
    /// `scale`: the largest cost magnitude the simplex will read; reduced costs above
    /// `-1e-12 scale` count as non-negative.
    fn new(n: usize, m: usize, cost: Cow<'c, [f64]>, scale: f64) -> Self {
        let scale = scale.max(1e-300);
        Self {
            n,
            m,
            cost,
            parent: vec![NONE; n + m],
            depth: vec![0; n + m],
            flow: vec![0.0; n + m],
            first_child: vec![NONE; n + m],
            next_sibling: vec![NONE; n + m],
            prev_sibling: vec![NONE; n + m],
            pot: vec![0.0; n + m],
            pivots: 0,
            eps: scale * 1e-12,
            up_snk: Vec::new(),
            up_src: Vec::new(),
        }
    }

    /// Cost of the arc between tree nodes `x` and `y` (one a source, the other a sink).
    fn arc_cost(&self, x: usize, y: usize) -> f64 {
        let (i, j) = if x < self.n {
            (x, y - self.n)
        } else {
            (y, x - self.n)
        };
        self.cost[i * self.m + j]
    }

    /// Makes the spanning tree `arcs` (from [`staircase`]) the basis, rooted at source 0.
    fn set_tree(&mut self, arcs: &[(usize, usize, f64)]) {
        let n = self.n;
        let mut adjacency: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n + self.m];
        for &(i, j, x) in arcs {
            adjacency[i].push((n + j, x));
            adjacency[n + j].push((i, x));
        }
        let mut stack = vec![0usize];
        self.parent[0] = 0;
        while let Some(x) = stack.pop() {
            for &(y, f) in &adjacency[x] {
                if self.parent[y] == NONE {
                    self.parent[y] = x;
                    self.depth[y] = self.depth[x] + 1;
                    self.flow[y] = f;
                    self.link(x, y);
                    self.pot[y] = self.arc_cost(x, y) - self.pot[x];
                    stack.push(y);
                }
            }
        }
    }

    /// Pivots until no arc of `runs` has a reduced cost below `-eps`.
    fn solve(&mut self, runs: &[Run]) {
        // Compiled for the widest vector instructions this CPU has, chosen at run time (the
        // pricing loop vectorises; no arithmetic changes, so neither does any pivot).
        pulp::Arch::new().dispatch(Solve(self, runs));
    }

    #[inline(always)]
    fn solve_body(&mut self, runs: &[Run]) {
        let (n, m) = (self.n, self.m);
        let arcs: usize = runs.iter().map(|&(_, start, end)| end - start).sum();
        if arcs == 0 {
            return;
        }
        let block = ((arcs as f64).sqrt().ceil() as usize).max(10).min(arcs);
        // The next arc to price, as its run and column; a block is scanned as stretches of
        // consecutive arcs within one run.
        let (mut r, mut col) = (0usize, runs[0].1);
        loop {
            // Block search for an entering arc.
            let (u, v) = self.pot.split_at(n);
            let mut best = (-self.eps, NONE);
            let mut scanned = 0;
            while scanned < arcs {
                let end = (scanned + block).min(arcs);
                while scanned < end {
                    let (row, _, run_end) = runs[r];
                    let run = (end - scanned).min(run_end - col);
                    let first = row * m + col;
                    price_run(
                        &self.cost[first..first + run],
                        &v[col..col + run],
                        u[row],
                        first,
                        &mut best,
                    );
                    scanned += run;
                    col += run;
                    if col == run_end {
                        r = if r + 1 == runs.len() { 0 } else { r + 1 };
                        col = runs[r].1;
                    }
                }
                if best.1 != NONE {
                    break;
                }
            }
            if best.1 == NONE {
                return;
            }
            let (i, j) = (best.1 / m, best.1 % m);
            self.pivot(i, n + j, best.0);
        }
    }

    /// Makes `c` the first child of `p`.
    fn link(&mut self, p: usize, c: usize) {
        let old = self.first_child[p];
        self.next_sibling[c] = old;
        self.prev_sibling[c] = NONE;
        if old != NONE {
            self.prev_sibling[old] = c;
        }
        self.first_child[p] = c;
    }

    /// Removes `c` from the children of `p`.
    fn unlink(&mut self, p: usize, c: usize) {
        let (prev, next) = (self.prev_sibling[c], self.next_sibling[c]);
        if prev == NONE {
            self.first_child[p] = next;
        } else {
            self.next_sibling[prev] = next;
        }
        if next != NONE {
            self.prev_sibling[next] = prev;
        }
    }

    fn pivot(&mut self, src: usize, snk: usize, rc: f64) {
        self.pivots += 1;
        // Walk both ends to the common ancestor. The cycle is src -> snk (entering arc, flow
        // up), then snk up to the ancestor and down to src. Going up from snk, an edge whose
        // child is a sink is traversed against its direction (flow down); going down to src,
        // an edge whose child is a source is traversed against its direction.
        let (mut x, mut y) = (snk, src);
        let mut up_snk = std::mem::take(&mut self.up_snk);
        let mut up_src = std::mem::take(&mut self.up_src);
        up_snk.clear();
        up_src.clear();
        while x != y {
            if self.depth[x] >= self.depth[y] {
                up_snk.push(x);
                x = self.parent[x];
            } else {
                up_src.push(y);
                y = self.parent[y];
            }
        }
        let n_sources = self.n;
        let is_sink = |v: usize| v >= n_sources;
        // Leaving edge: smallest flow among edges whose flow goes down; ties keep the first
        // met along the cycle from the entering arc.
        let mut theta = f64::INFINITY;
        let mut leave = NONE;
        let mut leave_on_src_side = false;
        for &c in &up_snk {
            if is_sink(c) && self.flow[c] < theta {
                theta = self.flow[c];
                leave = c;
            }
        }
        for &c in up_src.iter().rev() {
            if !is_sink(c) && self.flow[c] < theta {
                theta = self.flow[c];
                leave = c;
                leave_on_src_side = true;
            }
        }
        for &c in &up_snk {
            self.flow[c] += if is_sink(c) { -theta } else { theta };
        }
        for &c in &up_src {
            self.flow[c] += if is_sink(c) { theta } else { -theta };
        }
        // Re-root the detached subtree at the entering arc's end on its side.
        let (start, new_parent, path) = if leave_on_src_side {
            (src, snk, &up_src)
        } else {
            (snk, src, &up_snk)
        };
        let stop = path
            .iter()
            .position(|&c| c == leave)
            .unwrap_or(path.len().saturating_sub(1));
        let chain = &path[..=stop];
        // Detach `leave` from its parent.
        let old_parent = self.parent[leave];
        self.unlink(old_parent, leave);
        // Reverse the chain start = chain[0] .. chain[stop] = leave.
        for t in (1..chain.len()).rev() {
            let (child, par) = (chain[t], chain[t - 1]);
            // Edge (chain[t-1], chain[t]) was stored at chain[t-1]; its child becomes chain[t].
            self.unlink(child, par);
            self.link(par, child);
            self.parent[child] = par;
            self.flow[child] = self.flow[par];
        }
        self.parent[start] = new_parent;
        self.link(new_parent, start);
        self.flow[start] = theta;
        // Potentials and depths of the moved subtree, walked in preorder along the sibling links.
        // The depth is carried along the walk (one more going down, one less going up) rather
        // than read from the parent: that load waited on the previous store.
        // Sources on the moved side gain rc when it is src's side, lose it otherwise.
        let source_delta = if leave_on_src_side { rc } else { -rc };
        let mut v = start;
        let mut depth = self.depth[new_parent] + 1;
        'walk: loop {
            self.depth[v] = depth;
            self.pot[v] += if is_sink(v) {
                -source_delta
            } else {
                source_delta
            };
            let child = self.first_child[v];
            if child != NONE {
                v = child;
                depth += 1;
                continue;
            }
            loop {
                if v == start {
                    break 'walk;
                }
                let sibling = self.next_sibling[v];
                if sibling != NONE {
                    v = sibling;
                    break;
                }
                v = self.parent[v];
                depth -= 1;
            }
        }
        self.up_snk = up_snk;
        self.up_src = up_src;
    }

    fn plan(&self) -> Plan {
        let mut flows = Vec::with_capacity(self.n + self.m);
        let mut cost = 0.0;
        for v in 0..self.n + self.m {
            let p = self.parent[v];
            if p == v || p == NONE || self.flow[v] <= 0.0 {
                continue;
            }
            let (i, j) = if v < self.n {
                (v, p - self.n)
            } else {
                (p, v - self.n)
            };
            cost += self.flow[v] * self.cost[i * self.m + j];
            flows.push((i as u32, j as u32, self.flow[v]));
        }
        flows.sort_by_key(|&(i, j, _)| (i, j));
        Plan {
            cost,
            flows,
            pivots: self.pivots,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskrel_testkit::fixtures::Lcg;

    /// The scan in arc order that `price_run` must reproduce: strictly better replaces.
    fn scan(costs: &[f64], v: &[f64], ui: f64, first: usize, best: &mut (f64, usize)) {
        for (q, (&c, &vj)) in costs.iter().zip(v).enumerate() {
            let rc = c - ui - vj;
            if rc < best.0 {
                *best = (rc, first + q);
            }
        }
    }

    /// A labelled problem and its dense cost matrix, built as relatedness builds the label
    /// cost: `||B_j - e_k||` for a column-stochastic `B`.
    struct Case {
        x: Vec<f32>,
        y: Vec<f32>,
        xc: Vec<u32>,
        yc: Vec<u32>,
        label_cost: Vec<f64>,
        a: Vec<f64>,
        b: Vec<f64>,
    }

    fn case(
        rng: &mut Lcg,
        n: usize,
        m: usize,
        kx: usize,
        ky: usize,
        d: usize,
        uniform: bool,
    ) -> Case {
        // Clustered points: class centres plus noise, so class pairs differ in distance.
        let centre = |c: u32, k: usize| ((c as usize * 7 + k * 3) % 11) as f32 * 0.5;
        let mut draw = |classes: &[u32]| -> Vec<f32> {
            classes
                .iter()
                .flat_map(|&c| (0..d).map(move |k| (c, k)))
                .map(|(c, k)| centre(c, k) + rng.symmetric() as f32)
                .collect()
        };
        let xc: Vec<u32> = (0..n).map(|i| ((i * 5 + i / 3) % kx) as u32).collect();
        let yc: Vec<u32> = (0..m).map(|l| ((l * 3 + l / 2) % ky) as u32).collect();
        let (x, y) = (draw(&xc), draw(&yc));
        let mut label_cost = Vec::new();
        for _ in 0..kx {
            let column: Vec<f64> = (0..ky)
                .map(|_| rng.symmetric().abs().powi(3) + 1e-3)
                .collect();
            let total: f64 = column.iter().sum();
            for k in 0..ky {
                let dist: f64 = (0..ky)
                    .map(|q| (column[q] / total - f64::from(u8::from(q == k))).powi(2))
                    .sum();
                label_cost.push(dist.sqrt());
            }
        }
        let weights = |len: usize, rng: &mut Lcg| -> Vec<f64> {
            if uniform {
                vec![1.0 / len as f64; len]
            } else {
                let w: Vec<f64> = (0..len).map(|_| 1.1 + rng.symmetric()).collect();
                let s: f64 = w.iter().sum();
                w.iter().map(|v| v / s).collect()
            }
        };
        let (a, b) = (weights(n, rng), weights(m, rng));
        Case {
            x,
            y,
            xc,
            yc,
            label_cost,
            a,
            b,
        }
    }

    #[test]
    fn labelled_emd_reaches_the_dense_optimum() -> Result<()> {
        let mut rng = Lcg(5);
        let mut extra_rounds_seen = false;
        let mut scratch = LabelledScratch::default();
        for (trial, &(n, m, kx, ky, d, uniform, weight)) in [
            (60, 60, 4, 4, 5, true, 1e8),
            (73, 41, 5, 3, 3, false, 1e8),
            (50, 50, 3, 5, 8, true, 1e8),
            // Small weights: the class plan is not the whole story and other pairs must join.
            (64, 64, 4, 4, 4, true, 1.0),
            (45, 70, 3, 4, 2, false, 0.3),
            (30, 30, 2, 2, 6, true, 0.0),
        ]
        .iter()
        .enumerate()
        {
            let c = case(&mut rng, n, m, kx, ky, d, uniform);
            let mut dense = crate::ot::euclidean(&c.x, &c.y, d);
            for i in 0..n {
                for l in 0..m {
                    dense[i * m + l] +=
                        weight * c.label_cost[c.xc[i] as usize * ky + c.yc[l] as usize];
                }
            }
            let want = emd(&c.a, &c.b, &dense)?;
            let problem = Labelled {
                x: &c.x,
                y: &c.y,
                dim: d,
                x_classes: &c.xc,
                y_classes: &c.yc,
                label_cost: &c.label_cost,
                y_class_count: ky,
                weight,
            };
            let got = emd_labelled(&c.a, &c.b, &problem)?;
            // A scratch that held the earlier trials' costs (other shapes) gives the same plan.
            assert_eq!(emd_labelled_in(&mut scratch, &c.a, &c.b, &problem)?, got);
            // Same optimal value (to the simplex's tolerance), same marginals, and the value
            // is that of the plan returned.
            let tol = 1e-9 * want.cost.abs().max(1.0);
            assert!(
                (got.cost - want.cost).abs() <= tol,
                "trial {trial}: {} vs {}",
                got.cost,
                want.cost
            );
            let recomputed: f64 = got
                .flows
                .iter()
                .map(|&(i, l, f)| f * dense[i as usize * m + l as usize])
                .sum();
            assert!((recomputed - got.cost).abs() <= tol, "trial {trial}");
            for (sums, w) in [(got.row_sums(n), &c.a), (got.col_sums(m), &c.b)] {
                for (s, w) in sums.iter().zip(w.iter()) {
                    assert!((s - w).abs() <= 1e-12, "trial {trial}: marginal {s} vs {w}");
                }
            }
            // Mass on class pairs that the plan between the class masses leaves out: only the
            // check after the first solve can have let them in.
            let mass = |classes: &[u32], w: &[f64], k: usize| -> Vec<f64> {
                let mut out = vec![0.0; k];
                for (&c, &v) in classes.iter().zip(w) {
                    out[c as usize] += v;
                }
                out
            };
            let class_plan = emd(
                &mass(&c.xc, &c.a, kx),
                &mass(&c.yc, &c.b, ky),
                &c.label_cost,
            )?;
            let in_class_plan =
                |j: u32, k: u32| class_plan.flows.iter().any(|f| (f.0, f.1) == (j, k));
            extra_rounds_seen |= got
                .flows
                .iter()
                .any(|&(i, l, _)| !in_class_plan(c.xc[i as usize], c.yc[l as usize]));
        }
        assert!(
            extra_rounds_seen,
            "no case exercised pairs beyond the class plan"
        );
        Ok(())
    }

    #[test]
    fn labelled_emd_names_a_class_outside_the_label_cost() {
        let problem = Labelled {
            x: &[0.0, 1.0],
            y: &[0.5, 2.0],
            dim: 1,
            x_classes: &[0, 2],
            y_classes: &[0, 1],
            label_cost: &[0.0, 1.0, 1.0, 0.0],
            y_class_count: 2,
            weight: 1.0,
        };
        let Err(err) = emd_labelled(&[0.5, 0.5], &[0.5, 0.5], &problem) else {
            panic!("a class outside the label cost was accepted");
        };
        assert!(
            err.to_string()
                .contains("source point 1 has class 2, expected below 2"),
            "{err}"
        );
    }

    #[test]
    fn labelled_emd_names_a_non_finite_point() {
        // 21 target points of dimension 2 in class order (borrowed, not copied), one of them
        // infinite past the first eight lanes; source point 1 NaN in the second case.
        let y: Vec<f32> = (0..42)
            .map(|v| if v == 27 { f32::INFINITY } else { v as f32 })
            .collect();
        let x = [0.0, 1.0, f32::NAN, 2.0];
        for (x, y_ok, want) in [
            (
                &[0.0, 1.0, 2.0, 3.0][..],
                false,
                "target point 13 has a non-finite coordinate",
            ),
            (&x[..], true, "source point 1 has a non-finite coordinate"),
        ] {
            let y: Vec<f32> = if y_ok {
                y.iter().map(|v| v.min(1e3)).collect()
            } else {
                y.clone()
            };
            let y_classes: Vec<u32> = (0..21).map(|l| u32::from(l >= 10)).collect();
            let problem = Labelled {
                x,
                y: &y,
                dim: 2,
                x_classes: &[0, 1],
                y_classes: &y_classes,
                label_cost: &[0.0, 1.0, 1.0, 0.0],
                y_class_count: 2,
                weight: 1.0,
            };
            let Err(err) = emd_labelled(&[0.5, 0.5], &[1.0 / 21.0; 21], &problem) else {
                panic!("a non-finite point was accepted");
            };
            assert!(err.to_string().contains(want), "{err}");
        }
        assert_eq!(first_non_finite(&[1.0; 19]), None);
        assert_eq!(first_non_finite(&[0.0, f32::NEG_INFINITY, 3.0]), Some(1));
    }

    #[test]
    fn lane_pricing_picks_the_arc_an_ordered_scan_picks() {
        let mut rng = Lcg(11);
        for len in [0, 1, 7, 8, 9, 16, 23, 64, 81] {
            for trial in 0..50 {
                // Values on a coarse grid, so that equal reduced costs (ties) are common.
                let costs: Vec<f64> = (0..len).map(|_| (rng.symmetric() * 4.0).round()).collect();
                let v: Vec<f64> = (0..len).map(|_| (rng.symmetric() * 2.0).round()).collect();
                let ui = (rng.symmetric() * 2.0).round();
                let start = if trial % 2 == 0 {
                    (-1e-9, NONE)
                } else {
                    (-2.0, 3)
                };
                let (mut want, mut got) = (start, start);
                scan(&costs, &v, ui, 100, &mut want);
                price_run(&costs, &v, ui, 100, &mut got);
                assert_eq!(got, want, "len {len}, trial {trial}");
            }
        }
    }
}
