from nibblora.serve.cli import main

raise SystemExit(main())
