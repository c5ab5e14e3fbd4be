"""`python -m cloud --cloud URL | --cloud-api URL [cdcda.py's options]`: the cloud elsewhere.

    --cloud URL      steps 2-3 on the cloud service (`python -m cloud.server`): the device
                     uploads D_u and downloads the selection (`client.remote_augment`)
    --cloud-api URL  step 2 on any OpenAI-compatible server (vLLM) serving --cloud-model, one
                     conversation per request, --cloud-concurrency in flight (`client.api_chat`);
                     step 3 on the device
Every other option is cdcda.py's; the run is cdcda.py's, its cloud reached this way.
"""
import functools
import os
import sys
from dataclasses import replace

import augment
import cdcda
import options
import runner
from cloud import client
from errors import InputError


def main(argv=None) -> dict:
    p = options.parser(cdcda.METHODS)
    p.prog = "python -m cloud"
    p.description = "cdcda.py's run with its cloud on the cloud service or an OpenAI-compatible server"
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cloud", default=None, metavar="URL", help="augment and select on the cloud service "
                       "(`python -m cloud.server`) at URL (bearer token from $CDCDA_TOKEN)")
    where.add_argument("--cloud-api", default=None, metavar="URL", help="augment with --cloud-model on an "
                       "OpenAI-compatible server (vLLM; key from $OPENAI_API_KEY); the filters run here")
    p.add_argument("--cloud-concurrency", type=int, default=4, help="--cloud-api: requests in flight at once")
    args = p.parse_args(argv)
    options.check_ranges(p, args, {"cloud_concurrency": (lambda v: v >= 1, "at least 1")})
    settings = options.check(p, args, cdcda.METHODS, extra=("cloud", "cloud_api"))
    methods, prepare = cdcda.METHODS, cdcda.prepare
    if args.cloud:  # CDCDA-PLM with steps 2-3 on the service: the device uploads D_u, downloads the selection
        service = client.Endpoint(args.cloud, token=os.environ.get("CDCDA_TOKEN"))

        def remote(s: cdcda.Shared, user, seed: int) -> cdcda.Answers:
            pairs = cdcda.upload(s.task, user, s.rewrites)                                # 1
            selection = client.remote_augment(service, s.task.name, pairs, s.settings, seed)  # 2-3, there
            model, losses = cdcda.personalize(s.device, s.task, cdcda.download(pairs, selection.kept),
                                              s.settings, seed)                           # 4-5
            return cdcda.Answers(cdcda.answer(s.device, model, s.task, user.queries, s.settings, seed),
                                 model, losses, selection)
        methods = methods | {"cdcda": methods["cdcda"]._replace(answers=remote, cloud=False)}
        role = f"{args.cloud} (the cloud service: augmentation and filters)"
    else:  # M_cloud answers over the API; step 3 on the device
        api = client.Endpoint(args.cloud_api, token=os.environ.get("OPENAI_API_KEY"), timeout=120,
                              concurrency=args.cloud_concurrency)
        name = settings.cloud_model
        prepare = functools.partial(cdcda.prepare, cloud=augment.CloudLM(
            None, client.load_tokenizer(name), client.api_chat(api, name)))
        role = f"{args.cloud_api} (augmentation there, filters here)"
    try:
        return runner.run(replace(settings, roles={"cloud": role}), methods, prepare, cdcda.Family(),
                          cloud_here=not args.cloud)
    except (client.CloudUnavailable, client.CloudError) as e:  # the cloud down, or refusing: one line
        raise InputError(f"{e}\nfinished users are kept under {settings.out}/users; run again to resume") from None


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m cloud: error: {e}")
