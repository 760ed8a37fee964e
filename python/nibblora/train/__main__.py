from nibblora.train.cli import main

raise SystemExit(main())
