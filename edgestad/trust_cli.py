"""`edgestad thresholds` (edgestad/bundle_thresholds.py), `edgestad sign` and `edgestad keygen`
(edgestad/signing.py): torch-free, they run on devices."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("thresholds")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--pixel-fpr", type=float, default=None,
              help="Pixel threshold at this false-positive rate on the validation good pixels "
              "(from the quantiles stored at training time).")
@click.option("--pixel-threshold", type=float, default=None, help="Set the pixel threshold.")
@click.option("--image-false-reject", type=float, default=None,
              help="Image threshold for this share of good parts rejected: the k-th largest "
              "stored validation image score, k = floor(rate·(n+1)); a rate below 1/(n+1) is "
              "widened to it (0 = the largest validation score).")
@click.option("--image-threshold", type=float, default=None, help="Set the image threshold.")
@click.option("--review-false-reject", type=float, default=None,
              help="REVIEW band: a lower image threshold at this larger share of good parts "
              "(scores between it and the image threshold are REVIEW).")
@click.option("--review-threshold", type=float, default=None,
              help="Set the REVIEW band's lower threshold.")
@click.option("--no-review", is_flag=True, help="Remove the REVIEW band.")
@click.option("--defects", "defects_dir", type=click.Path(path_type=Path), default=None,
              help="A folder of real defective images: set the image threshold so that --recall "
              "of them are NG (scored by the exported fp32 graph) and report the expected share "
              "of good parts NG from the stored validation scores.")
@click.option("--recall", type=float, default=0.95, show_default=True,
              help="With --defects: the share of the defective images that must be NG.")
@click.option("--show", is_flag=True, help="Print the thresholds, their rules, the stored "
              "statistics, the digest and graph status and the history; change nothing.")
@click.option("--seal", is_flag=True, help="Adopt the manifest's decision sections as they are "
              "now (bundles written before the digest existed, or a hand edit you accept); recorded "
              "in thresholds_history.")
@click.option("--reason", default=None, help="Why (recorded in thresholds_history).")
def thresholds(bundle, pixel_fpr, pixel_threshold, image_false_reject, image_threshold,
               review_false_reject, review_threshold, no_review, defects_dir, recall, show, seal,
               reason):
    """Show or change the decision thresholds of BUNDLE without retraining.

    Recomputes from the validation statistics stored at training time (--pixel-fpr,
    --image-false-reject) or sets a value (--pixel-threshold, --image-threshold); records
    who/when/old/new/rule in the manifest's thresholds_history, rewrites the thresholds baked into
    every exported graph, removes TensorRT engines built from the old graphs (rebuild with
    `edgestad export`) and updates the decision digest.
    """
    from edgestad.bundle import default_bundle_path, load_bundle
    from edgestad import bundle_thresholds

    bundle_path = bundle if bundle is not None else default_bundle_path()
    if pixel_fpr is not None and pixel_threshold is not None:
        raise click.UsageError("--pixel-fpr and --pixel-threshold both set the pixel threshold; give one")
    image_given = [v for v in (image_false_reject, image_threshold, defects_dir) if v is not None]
    if len(image_given) > 1:
        raise click.UsageError("--image-false-reject, --image-threshold and --defects each set the "
                               "image threshold; give one")
    review_given = [v for v in (review_false_reject, review_threshold) if v is not None]
    if len(review_given) > 1 or (review_given and no_review):
        raise click.UsageError("--review-false-reject, --review-threshold and --no-review each "
                               "set the REVIEW band; give one")
    changes = [v for v in (pixel_fpr, pixel_threshold, image_false_reject, image_threshold,
                           review_false_reject, review_threshold, defects_dir) if v is not None]
    changes += [True] if no_review else []
    if show:
        if changes or seal:
            raise click.UsageError("--show changes nothing; give it alone")
        click.echo(bundle_thresholds.describe(load_bundle(bundle_path, check_decisions=False)))
        return
    if seal:
        if changes:
            raise click.UsageError("--seal adopts the manifest as it is; give it without new values")
        entry = bundle_thresholds.seal(bundle_path, reason=reason, log=click.echo)
        click.echo(f"sealed {bundle_path}: {entry['rule']}")
        return
    if not changes:
        raise click.UsageError("give --pixel-fpr, --pixel-threshold, --image-false-reject, "
                               "--image-threshold, --defects, --review-false-reject, "
                               "--review-threshold, --no-review, --show or --seal")
    entry = bundle_thresholds.change_thresholds(bundle_path, pixel_fpr=pixel_fpr, image_false_reject=image_false_reject,
                                                pixel=pixel_threshold, image=image_threshold,
                                                review_false_reject=review_false_reject, review=review_threshold,
                                                no_review=no_review, defects_dir=defects_dir, recall=recall,
                                                reason=reason, log=click.echo)
    review = ""
    if entry["old"].get("image_review") is not None or entry["new"].get("image_review") is not None:
        review = f", review {entry['old'].get('image_review')} -> {entry['new'].get('image_review')}"
    click.echo(f"thresholds of {bundle_path}: pixel {entry['old']['pixel']} -> {entry['new']['pixel']}, "
               f"image {entry['old']['image']} -> {entry['new']['image']}{review} ({entry['rule']}; "
               f"by {entry['by']} at {entry['at']})")


@click.command("sign")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path),
              help="Ed25519 private key (PEM), e.g. from `edgestad keygen`.")
def sign(bundle, key):
    """Sign BUNDLE for a fleet: signature.json over its file hashes and decision digest.

    Devices running `edgestad run --trusted-key PUB` refuse unsigned bundles and bundles changed
    after signing.
    """
    from edgestad.bundle import default_bundle_path
    from edgestad import signing

    bundle_path = bundle if bundle is not None else default_bundle_path()
    path = signing.sign_bundle(bundle_path, key)
    pub = signing.load_private_key(key).public_key()
    click.echo(f"wrote {path} (key {signing.key_id(pub)})")


@click.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for edgestad-signing.key (private, mode 0600) and edgestad-signing.pub.")
def keygen(out_dir):
    """Make an Ed25519 key pair for `edgestad sign` / `edgestad run --trusted-key`."""
    from edgestad import signing

    private, public = signing.keygen(out_dir)
    key = signing.load_public_key(public, "--out")
    click.echo(f"wrote {private} (private: keep it off the devices) and {public} (give this to "
               f"`edgestad run --trusted-key`); key id {signing.key_id(key)}")
